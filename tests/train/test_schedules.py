import math

import pytest
import torch

import upcycle
from upcycle.kernels.reference import bank_topk_mask
from upcycle.recipes.bank_sparse.modules import sparse_ffns
from upcycle.recipes.bank_sparse.training import apply_keep, aux_weight_at, keep_at
from upcycle.testing import tiny_model
from upcycle.train.schedules import lr_factor


@pytest.mark.parametrize("shape", ["linear", "cosine"])
def test_keep_warmup_goes_from_dense_to_target_monotonically(shape):
    keeps = [keep_at(s, 64, 16, 10, shape) for s in range(15)]
    assert keeps[0] == 64 and keeps[10:] == [16] * 5
    assert all(a >= b for a, b in zip(keeps, keeps[1:]))
    assert keeps[5] == 40  # both shapes are at the midpoint half way
    assert [keep_at(s, 64, 16, 0) for s in range(3)] == [16, 16, 16]  # fixed from step 0


def test_every_keep_of_the_schedule_gives_a_valid_topk_mask():
    model = tiny_model(vocab_size=512)
    upcycle.convert(model, upcycle.BankSparseConfig(bank_size=64, keep=16), progress=False)
    z = torch.randn(7, 256)
    for step in range(12):
        apply_keep(model, step, 10, "cosine")
        for _, m in sparse_ffns(model):
            mask = bank_topk_mask(z, m.bank_size, m.keep)
            assert (mask.reshape(7, 4, 64).sum(-1) == m.keep).all()
            assert m.target_keep == 16


def test_lr_warmup_then_cosine_to_min():
    f = [lr_factor(s, 100, 10, 0.1) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0) and f[10] == pytest.approx(1.0)
    assert f[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(a >= b for a, b in zip(f[10:], f[11:])) and f[-1] > 0.1
    assert lr_factor(100, 100, 10, 0.1) == pytest.approx(0.1)


def test_aux_weight_decays_to_zero():
    assert [aux_weight_at(s, 0.5, 4) for s in range(6)] == [0.5, 0.375, 0.25, 0.125, 0.0, 0.0]
    assert aux_weight_at(99, 0.5, 0) == 0.5
