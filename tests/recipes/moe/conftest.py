"""Tiny random Llama / Qwen2 / Mistral parents (hidden 64, d_ff 256, 2 layers) and MoE checkpoints of them."""

from __future__ import annotations

import pytest
import torch

from upcycle.testing import tiny_model

VOCAB = 512


def make_parent(kind: str = "llama", seed: int = 0, **overrides) -> torch.nn.Module:
    """A random tiny causal LM in eval mode; Qwen2 gets non-zero q/k/v biases (dropping them would show)."""
    model = tiny_model(kind, seed=seed, vocab_size=overrides.pop("vocab_size", VOCAB), **overrides)
    if kind == "qwen2":
        with torch.no_grad():
            for layer in model.model.layers:
                for n in ("q_proj", "k_proj", "v_proj"):
                    getattr(layer.self_attn, n).bias.normal_(std=0.1)
    return model


def spread_routers(model: torch.nn.Module, std: float = 0.5) -> None:
    """Router rows large enough that routing is far from uniform (so a wrong expert order would show)."""
    from upcycle.recipes.moe import moe_ffns

    with torch.no_grad():
        for _, m in moe_ffns(model):
            m.gate.weight.normal_(std=std)


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs on one intra-op thread (see tests/conftest.py: one_thread)."""


@pytest.fixture(scope="session")
def moe_dir(tmp_path_factory, dense_dir, tokenizer):
    """dense_dir (tiny Qwen2) converted to 4 copied experts top-2 (Drop-Upcycling 0.5), saved with its tokenizer
    and its parent recorded as `source` (what `upcycle convert` writes)."""
    import upcycle

    model = upcycle.load(dense_dir)
    upcycle.convert(model, upcycle.MoEUpcycleConfig(num_experts=4, top_k=2, drop_upcycle=0.5), progress=False)
    model.config.upcycle["source"] = str(dense_dir)
    return upcycle.save(model, tmp_path_factory.mktemp("moe") / "model", tokenizer=tokenizer)


@pytest.fixture
def tiny_train_config():
    """factory(model, data, out, **overrides) -> a few-second TrainConfig on the tiny model (as tests/train)."""
    from upcycle.train import TrainConfig

    def make(model, data, out, **kw):
        base = dict(model=str(model), data=[str(d) for d in data], out=str(out), seq_len=64, batch_size=4, steps=6,
                    lr=3e-3, eval_every=0, save_every=0, progress=False, tensorboard=False, num_threads=1,
                    val_max_sequences=8)
        return TrainConfig.from_dict({**base, **kw})  # recipe options as flat keys, like flags

    return make
