"""Fixtures for the training tests: a converted tiny checkpoint and one CPU thread per process
(shared CI cores: several threads per process oversubscribe them and slow every step down)."""

from __future__ import annotations

import pytest
import torch

import upcycle


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def sparse_dir(tmp_path_factory, dense_dir, tokenizer):
    """The tiny dense Qwen2 checkpoint converted to bank-sparse (banks of 64, keep 16), with tokenizer."""
    model = upcycle.load(dense_dir)
    upcycle.convert(model, upcycle.BankSparseConfig(bank_size=64, keep=16), progress=False)
    return upcycle.save(model, tmp_path_factory.mktemp("sparse") / "model", tokenizer=tokenizer)


@pytest.fixture
def tiny_train_config():
    """factory(model, data, out, **overrides) -> a few-second TrainConfig on the tiny model."""
    return _tiny_train_config


def _tiny_train_config(model, data, out, **kw):
    from upcycle.train import TrainConfig

    base = dict(model=str(model), data=[str(d) for d in data], out=str(out), seq_len=64, batch_size=4, steps=6,
                lr=3e-3, eval_every=0, save_every=0, progress=False, tensorboard=False, num_threads=1,
                val_max_sequences=8)
    base.update(kw)
    return TrainConfig(**base)
