"""Fixtures for the eval tests: a saved bank-sparse checkpoint next to the dense one, and held-out text."""

from __future__ import annotations

import pytest
import torch

import upcycle
from upcycle import BankSparseConfig
from upcycle.toy import stdlib_corpus


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine the thread pool's
    spin-waits made these tests ~10-25x slower; restored after each test."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def sparse_dir(tmp_path_factory, dense_dir, tokenizer):
    """The dense_dir model converted to 16-of-64 (SVD predictor) and saved with its tokenizer."""
    model = upcycle.load(dense_dir)
    upcycle.convert(model, BankSparseConfig(), progress=False)
    return upcycle.save(model, tmp_path_factory.mktemp("sparse") / "model", tokenizer=tokenizer)


@pytest.fixture(scope="session")
def heldout_file(tmp_path_factory):
    """Text the tokenizer was not trained on (the corpus fixture is the first 300 KB)."""
    f = tmp_path_factory.mktemp("heldout") / "heldout.txt"
    f.write_text("\n\n".join(stdlib_corpus(max_bytes=20_000, skip_bytes=600_000)))
    return f


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("calib") / "calib.txt"
    f.write_text("\n\n".join(stdlib_corpus(max_bytes=20_000, skip_bytes=700_000)))
    return f
