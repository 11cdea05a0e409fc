"""Bank-sparse routing on an N:M model: the N:M section survives under upcycle.stacked, and training keeps both
invariants (the N:M zeros stay exactly zero, the bank-sparse keep holds)."""

from __future__ import annotations

import json

import pytest
import torch

import upcycle
from upcycle.cli import main
from upcycle.recipes import registry, stacking
from upcycle.recipes.bank_sparse import sparse_ffns
from upcycle.recipes.nm import exactness
from upcycle.recipes.nm.convert import targets
from upcycle.train import TrainConfig, train


@pytest.fixture
def stacked_dir(nm_dirs, tokenizer, tmp_path):
    model = upcycle.load(nm_dirs["magnitude"])
    upcycle.convert(model, upcycle.BankSparseConfig(bank_size=64, keep=16), progress=False)
    return upcycle.save(model, tmp_path / "stacked", tokenizer=tokenizer)


def test_the_nm_section_is_kept_under_stacked(stacked_dir, dense_dir, capsys):
    meta = json.loads((stacked_dir / "config.json").read_text())["upcycle"]
    assert meta["recipe"] == "bank_sparse" and meta["stacked"]["nm"]["n"] == 2
    assert meta["source"] == str(dense_dir)  # the other extra keys survive too
    model = upcycle.load(stacked_dir)
    assert registry.for_model(model).name == "bank_sparse" and stacking.sections(model)["nm"]["method"] == "magnitude"
    assert exactness(model, upcycle.NMSparseConfig())["exact"]
    with pytest.raises(ValueError, match="apply the N:M recipe to the dense model first"):
        upcycle.convert(model, upcycle.NMSparseConfig())
    assert main(["info", str(stacked_dir)]) == 0
    printed = capsys.readouterr().out
    assert "bank_sparse" in printed and "stacked on: nm (" in printed and "method=magnitude" in printed


def test_training_keeps_the_nm_zeros_and_the_banks(stacked_dir, text_file, tmp_path):
    before = upcycle.load(stacked_dir)
    cfg = TrainConfig.from_dict(dict(model=str(stacked_dir), data=[str(text_file)], out=str(tmp_path / "run"),
                                     seq_len=64, batch_size=4, steps=4, lr=3e-3, eval_every=0, save_every=0,
                                     progress=False, tensorboard=False, num_threads=1, val_max_sequences=8,
                                     distill_weight=0.5, weight_decay=0.1))
    result = train(cfg)
    after = upcycle.load(result.model_dir)
    meta = after.config.upcycle
    assert meta["recipe"] == "bank_sparse" and "nm" in meta["stacked"]
    assert [m.keep for _, m in sparse_ffns(after)] == [16, 16]
    nm = upcycle.NMSparseConfig()
    for (name, a), b in zip(targets(after, nm).items(), targets(before, nm).values(), strict=True):
        assert torch.equal(a.weight == 0, b.weight == 0), name
        assert not torch.equal(a.weight, b.weight), name


def test_composed_hooks_merge_and_refuse_two_optimizers():
    a, b = registry.TrainHooks(), registry.TrainHooks()
    a.param_groups, b.param_groups = {"x": {}}, {"y": {}}
    hooks = stacking.ComposedHooks([("a", a), ("b", b)])
    assert set(hooks.param_groups) == {"x", "y"} and hooks.optimizer([], (0.9, 0.95)) is None
    b.optimizer = lambda groups, betas: object()
    a.optimizer = lambda groups, betas: object()
    with pytest.raises(ValueError, match="each bring their own optimizer"):
        hooks.optimizer([], (0.9, 0.95))
