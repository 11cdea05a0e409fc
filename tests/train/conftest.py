"""Fixtures for the training tests: a few-second TrainConfig on the tiny model."""

from __future__ import annotations

import pytest


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
    return TrainConfig.from_dict(base)  # recipe options (keep_warmup_steps, ...) as flat keys, like flags


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs on one intra-op thread (see tests/conftest.py: one_thread)."""
