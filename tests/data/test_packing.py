import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from upcycle.data import load_tokenizer, resolve_files
from upcycle.data.packing import PackedData, load_documents, tokenize_and_pack


def test_text_jsonl_parquet_and_directories(tmp_path, tokenizer):
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("first document text")
    (d / "sub" / "b.jsonl").write_text(json.dumps({"text": "second doc"}) + "\n" + json.dumps({"text": "third"}) + "\n")
    pq.write_table(pa.table({"text": ["fourth doc", "fifth"]}), d / "c.parquet")
    (d / "ignored.bin").write_bytes(b"\0")
    assert set(resolve_files([d])) == {"text", "json", "parquet"}
    docs = load_documents([d], cache_dir=str(tmp_path / "cache"))
    assert sorted(docs[:]["text"]) == sorted(["first document text", "second doc", "third", "fourth doc", "fifth"])
    # EOS after every document, rows of exactly seq_len tokens
    ids = tokenize_and_pack(docs, tokenizer, seq_len=4)[:]["input_ids"]
    flat = ids.reshape(-1).tolist()
    n_tokens = sum(len(tokenizer(t)["input_ids"]) + 1 for t in docs[:]["text"])
    assert ids.shape == (n_tokens // 4, 4)
    assert flat.count(tokenizer.eos_token_id) in (4, 5)  # the tail past the last full row is dropped


def test_paragraph_split_puts_eos_between_paragraphs(tmp_path, tokenizer):
    f = tmp_path / "t.txt"
    f.write_text("one story\n\ntwo story\n\nthree story")
    docs = load_documents([f], text_split="paragraph", cache_dir=str(tmp_path / "cache"))
    assert len(docs) == 3


def test_errors_name_the_fix(tmp_path, tokenizer):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_files([tmp_path / "missing.txt"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no"):
        resolve_files([tmp_path / "empty"])
    blank = tmp_path / "blank.txt"
    blank.write_text("   \n")
    with pytest.raises(ValueError, match="no text"):
        tokenize_and_pack(load_documents([blank], cache_dir=str(tmp_path / "c")), tokenizer, 8)
    short = tmp_path / "short.txt"
    short.write_text("a few words")
    with pytest.raises(ValueError, match="shorter than one sequence of 4096.*--seq-len"):
        tokenize_and_pack(load_documents([short], cache_dir=str(tmp_path / "c")), tokenizer, 4096)
    with pytest.raises(ValueError, match="no tokenizer"):
        tokenize_and_pack(load_documents([short], cache_dir=str(tmp_path / "c")), None, 4)
    with pytest.raises(ValueError, match="--tokenizer"):
        load_tokenizer(str(tmp_path / "empty"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(ValueError, match="--text-field"):
        load_documents([bad], cache_dir=str(tmp_path / "c"))


def _packed(n=50, seq_len=3):
    import datasets

    return datasets.Dataset.from_dict({"input_ids": torch.arange(n * seq_len).reshape(n, seq_len).tolist()}
                                      ).with_format("torch")


def test_split_and_order_are_deterministic_and_disjoint():
    a = PackedData.split(_packed(), 0.1, 64, seed=3)
    b = PackedData.split(_packed(), 0.1, 64, seed=3)
    c = PackedData.split(_packed(), 0.1, 64, seed=4)
    assert torch.equal(a.val_idx, b.val_idx) and not torch.equal(a.val_idx, c.val_idx)
    assert len(a.val_idx) == 5 and not set(a.val_idx.tolist()) & set(a.train_idx.tolist())
    # positions past one epoch wrap into a fresh permutation that still covers every training row once
    two_epochs = a.train_indices(0, 2 * 45)
    assert sorted(two_epochs[:45].tolist()) == sorted(two_epochs[45:].tolist()) == sorted(a.train_idx.tolist())
    assert not torch.equal(two_epochs[:45], two_epochs[45:])
    assert torch.equal(a.train_indices(40, 10), two_epochs[40:50])  # resumable from any position
    with pytest.raises(ValueError, match="--val-fraction 0"):
        PackedData.split(_packed(n=1), 0.1, 64, seed=0)


def test_ranks_and_micro_batches_partition_the_global_batch():
    data = PackedData.split(_packed(), 0.0, 64, seed=0)
    one_proc = [data.micro_batch(8, 8, rank=0, micro=m, batch_size=2, grad_accum=4) for m in range(4)]
    four_procs = [data.micro_batch(8, 8, rank=r, micro=0, batch_size=2, grad_accum=1) for r in range(4)]
    assert torch.equal(torch.cat(one_proc), torch.cat(four_procs))
    assert torch.equal(torch.cat(one_proc), data.fetch(data.train_indices(8, 8)))
