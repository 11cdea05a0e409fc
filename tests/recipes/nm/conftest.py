"""Tiny Llama / Qwen2 models for the N:M recipe's tests, one intra-op thread."""

from __future__ import annotations

import pytest
import torch

from upcycle.testing import tiny_model


def uneven_model(arch: str = "llama", seed: int = 0, vocab_size: int = 512, **kw):
    """A tiny random model whose RMSNorm gains are log-normal, so the inputs of q/k/v/gate/up have very different
    channel norms (as in real LLMs) and activation-aware pruning has something to find."""
    model = tiny_model(arch, seed=seed, vocab_size=vocab_size, **kw)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight"):
                p.copy_(torch.exp(torch.randn(p.shape, generator=g)))
    return model


def calib_ids(n: int = 8, length: int = 32, seed: int = 0, vocab: int = 512) -> torch.Tensor:
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def uneven():
    """factory(arch="llama", seed=0, **kw) -> a tiny model with log-normal norm gains (see uneven_model)."""
    return uneven_model


@pytest.fixture
def calib():
    """factory(n=8, length=32, seed=0) -> calibration token ids [n, length]."""
    return calib_ids


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models gain nothing from intra-op threads (see tests/conftest.py: one_thread)."""


@pytest.fixture(scope="session")
def nm_dirs(tmp_path_factory, dense_dir, tokenizer):
    """dense_dir converted with the nm recipe, one checkpoint per method, the dense parent recorded as `source`
    (what `upcycle convert` records)."""
    import upcycle

    out = {}
    root = tmp_path_factory.mktemp("nm")
    for method in ("magnitude", "cast", "srste"):
        model = upcycle.load(dense_dir)
        upcycle.convert(model, upcycle.NMSparseConfig(method=method), progress=False)
        model.config.upcycle["source"] = str(dense_dir)
        out[method] = upcycle.save(model, root / method, tokenizer=tokenizer)
    return out
