"""Shared fixtures: tiny random models and a tiny checkpoint directory with a BPE tokenizer."""

from __future__ import annotations

import pytest
import torch

from upcycle.testing import stdlib_corpus, tiny_model, train_bpe_tokenizer


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def corpus() -> list[str]:
    return stdlib_corpus(max_bytes=300_000)


@pytest.fixture(scope="session")
def tokenizer(corpus):
    return train_bpe_tokenizer(corpus, vocab_size=512)


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from intra-op threads; on a shared 2-core machine the thread pool's
    spin-waits made tests 10-25x slower. Restored after the test."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def sparse_dir(tmp_path_factory, dense_dir, tokenizer):
    """dense_dir converted to 16-of-64 banks (a low-rank SVD predictor, pinned) and saved with its tokenizer."""
    import upcycle

    model = upcycle.load(dense_dir)
    upcycle.convert(model, upcycle.BankSparseConfig(bank_size=64, keep=16, predictor="lowrank"), progress=False)
    return upcycle.save(model, tmp_path_factory.mktemp("sparse") / "model", tokenizer=tokenizer)


@pytest.fixture(scope="session")
def shadow_dir(tmp_path_factory, dense_dir, tokenizer):
    """dense_dir converted with the defaults (at this shape a 1-bit shadow with a learned bias), saved."""
    import upcycle

    model = upcycle.load(dense_dir)
    upcycle.convert(model, upcycle.BankSparseConfig(), progress=False)
    from upcycle.recipes.bank_sparse import sparse_ffns

    assert next(m for _, m in sparse_ffns(model)).predictor.kind == "shadow"
    return upcycle.save(model, tmp_path_factory.mktemp("shadow") / "model", tokenizer=tokenizer)


@pytest.fixture(params=["qwen2", "llama"])
def arch(request) -> str:
    return request.param


@pytest.fixture
def tiny(arch):
    return tiny_model(arch, vocab_size=512)


@pytest.fixture(scope="session")
def dense_dir(tmp_path_factory, tokenizer):
    """A tiny dense Qwen2 checkpoint saved by transformers, with its tokenizer."""
    d = tmp_path_factory.mktemp("dense") / "model"
    model = tiny_model("qwen2", vocab_size=len(tokenizer))
    model.save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def text_file(tmp_path_factory, corpus):
    f = tmp_path_factory.mktemp("data") / "train.txt"
    f.write_text("\n\n".join(corpus[:40]))
    return f
