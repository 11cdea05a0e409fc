"""Local text -> packed token sequences -> deterministic, resumable batches.

Files (local only) become a Hugging Face `datasets.Dataset` of documents (text files through upcycle's own
reader, .jsonl / .parquet through datasets' builders), are tokenised with the model's tokenizer, get EOS
after every document, and are packed into
fixed-length rows held in an Arrow table (memory-mapped, so corpora larger than RAM work). The
order of training rows is a seeded permutation per epoch, so the whole data position is one integer:
the number of sequences consumed.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from upcycle.data.files import read_text_file, resolve_files
from upcycle.data.text import iter_documents, split_documents

log = logging.getLogger(__name__)


def _text_rows(files: list[str], split: str, stamps: list):
    """Rows {"text": doc} of plain-text files (`stamps` only keys the datasets cache: path, size, mtime)."""
    for doc in iter_documents(files, split):
        yield {"text": doc}


def load_documents(paths: list[str | os.PathLike], text_split: str = "document", text_field: str = "text",
                   cache_dir: str | None = None):
    """A `datasets.Dataset` with one column `text`, one row per document (memory-mapped Arrow, so corpora
    larger than RAM work). Text files go through upcycle's own reader (UTF-8 checked, split as asked);
    .jsonl and .parquet through datasets' builders, the text in column `text_field`."""
    import datasets

    parts = []
    for kind, files in resolve_files(paths).items():
        if kind == "text":
            stamps = [(f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files]
            split_documents("", text_split)  # a bad text_split fails here, not inside datasets' generator
            if next(iter_documents(files, text_split), None) is None:
                # datasets cannot build a dataset from an empty generator (and every file is read, UTF-8 checked)
                ds = datasets.Dataset.from_dict({"text": []}, features=datasets.Features(text=datasets.Value("string")))
            else:
                ds = datasets.Dataset.from_generator(
                    _text_rows, gen_kwargs={"files": files, "split": text_split, "stamps": stamps},
                    features=datasets.Features(text=datasets.Value("string")), cache_dir=cache_dir)
            parts.append(ds)
            continue
        if kind == "json":
            for f in files:
                read_text_file(f, limit=1 << 20)  # a binary file named .jsonl: refused with its name
        try:
            ds = datasets.load_dataset(kind, data_files=files, split="train", cache_dir=cache_dir)
        except Exception as e:
            raise ValueError(f"datasets could not read {kind} files {files[:3]}: {type(e).__name__}: {e}") from e
        if text_field not in ds.column_names:
            raise ValueError(
                f"{files[0]} has no {text_field!r} field (fields: {ds.column_names}): "
                f"pass --text-field NAME or write the text under {text_field!r}."
            )
        ds = ds.select_columns([text_field])
        if text_field != "text":
            ds = ds.rename_column(text_field, "text")
        if ds.features["text"] != datasets.Value("string"):
            ds = ds.cast_column("text", datasets.Value("string"))
        parts.append(ds)
    return datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]


def _pack_fn(tokenizer, seq_len: int):
    eos = tokenizer.eos_token_id

    def pack(batch: dict) -> dict:
        texts = [t for t in batch["text"] if t and t.strip()]
        ids: list[int] = []
        for doc in tokenizer(texts, verbose=False)["input_ids"] if texts else []:
            ids.extend(doc)
            if not doc or doc[-1] != eos:  # some tokenizers append EOS themselves
                ids.append(eos)
        n = len(ids) // seq_len
        # The tail of each map batch (< seq_len tokens) is dropped, as in HF run_clm; a batch is many documents.
        return {"input_ids": [ids[i * seq_len : (i + 1) * seq_len] for i in range(n)]}

    return pack


def tokenize_and_pack(docs, tokenizer, seq_len: int, num_proc: int = 1, batch_docs: int = 1000):
    """Rows of exactly `seq_len` token ids, EOS after each document. Raises if no full row results."""
    if tokenizer is None:
        raise ValueError("the model has no tokenizer: pass --tokenizer DIR or save one next to the model.")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token: set tokenizer.eos_token and save it again.")
    packed = docs.map(
        _pack_fn(tokenizer, seq_len), batched=True, batch_size=batch_docs, remove_columns=docs.column_names,
        num_proc=num_proc if num_proc > 1 else None, desc="tokenise+pack",
    )
    if len(packed) == 0:  # small data: cheap to count exactly what there is
        texts = [t for t in docs[:]["text"] if t and t.strip()]
        if not texts:
            raise ValueError("the data holds no text (every file or row is empty): pass non-empty data.")
        n_tok = sum(len(ids) + 1 for ids in tokenizer(texts, verbose=False)["input_ids"])
        raise ValueError(
            f"the data has {n_tok} tokens, shorter than one sequence of {seq_len}: add data or lower --seq-len."
        )
    return packed.select_columns(["input_ids"]).with_format("torch")


@dataclass
class PackedData:
    """Train/validation rows of a packed dataset, split and ordered by `seed`."""

    rows: object  # datasets.Dataset with `input_ids` [seq_len] per row (torch format)
    train_idx: Tensor
    val_idx: Tensor
    seed: int

    @classmethod
    def split(cls, rows, val_fraction: float, val_max_sequences: int, seed: int) -> PackedData:
        n = len(rows)
        n_val = 0 if val_fraction == 0 else min(val_max_sequences, max(1, round(n * val_fraction)))
        if n - n_val < 1:
            raise ValueError(
                f"the data gives only {n} sequence(s): too few for a training split plus {n_val} held out. "
                "Add data, lower --seq-len, or pass --val-fraction 0."
            )
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        return cls(rows, perm[n_val:], perm[:n_val], seed)

    @property
    def seq_len(self) -> int:
        return len(self.rows[0]["input_ids"])

    def train_indices(self, start: int, count: int) -> Tensor:
        """Training row ids of global sequence positions [start, start + count), epochs reshuffled by seed."""
        n = len(self.train_idx)
        out, pos = [], start
        while pos < start + count:
            epoch, offset = divmod(pos, n)
            take = min(n - offset, start + count - pos)
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch + 1))
            out.append(self.train_idx[order[offset : offset + take]])
            pos += take
        return torch.cat(out)

    def fetch(self, idx: Tensor) -> Tensor:
        """[len(idx), seq_len] int64 token ids."""
        return self.rows[idx.tolist()]["input_ids"].long()

    def micro_batch(self, consumed: int, step_sequences: int, rank: int, micro: int, batch_size: int,
                    grad_accum: int) -> Tensor:
        """Rows of one micro-batch: the global batch of a step is split rank-major, then by micro-batch,
        so 1 process x grad_accum=2 sees exactly what 2 processes x grad_accum=1 see."""
        first = consumed + (rank * grad_accum + micro) * batch_size
        return self.fetch(self.train_indices(first, batch_size))

    def val_batches(self, batch_size: int, rank: int = 0, world: int = 1):
        """This rank's share of the held-out rows, in batches."""
        mine = self.val_idx[rank::world]
        for i in range(0, len(mine), batch_size):
            yield self.fetch(mine[i : i + batch_size])


def build_data(cfg, tokenizer, is_main: bool = True, barrier=lambda: None) -> PackedData:
    """Load, tokenise, pack and split `cfg.data`. The main process fills the datasets cache first."""
    import datasets

    cache = cfg.data_cache or str(Path(cfg.out) / ".cache" / "datasets")
    progress = datasets.utils.logging.is_progress_bar_enabled()
    if not is_main:
        datasets.disable_progress_bars()

    def make():
        docs = load_documents(cfg.data, cfg.text_split, cfg.text_field, cache_dir=cache)
        return tokenize_and_pack(docs, tokenizer, cfg.seq_len, cfg.num_proc)

    rows = error = None
    if is_main:
        try:
            rows = make()
        except Exception as e:  # the other ranks wait at the barrier; they raise the same error after it
            error = e
    barrier()
    if error is not None:
        raise error
    if not is_main:
        rows = make()
    if progress:
        datasets.enable_progress_bars()
    data = PackedData.split(rows, cfg.val_fraction, cfg.val_max_sequences, cfg.seed)
    log.info("data: %d sequences of %d tokens (%d train, %d held out)", len(rows), cfg.seq_len,
             len(data.train_idx), len(data.val_idx))
    return data
