"""N:M training through the generic trainer: CAST (AdamS, mask refresh, weight scaling, hard prune), SR-STE,
fixed-mask fine-tuning of a one-shot model; exact N:M after training and after save/load; resume."""

from __future__ import annotations

import json
import signal

import pytest
import torch

import upcycle
from upcycle.recipes.nm import exactness, training
from upcycle.recipes.nm.convert import targets
from upcycle.recipes.nm.optim import AdamS
from upcycle.testing import tiny_model
from upcycle.train import TrainConfig, train


def _cfg(model, data, out, **kw):
    base = dict(model=str(model), data=[str(data)], out=str(out), seq_len=64, batch_size=4, steps=8, lr=3e-3,
                eval_every=0, save_every=0, progress=False, tensorboard=False, num_threads=1, val_max_sequences=8,
                distill_weight=0.5, cast_ramp_steps=8, mask_refresh_every=4)
    base.update(kw)
    return TrainConfig.from_dict(base)


def _metrics(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def optimizers(monkeypatch):
    """The optimizer every NMHooks returned (a silent fall-back to AdamW would show as None here)."""
    seen = []
    original = training.NMHooks.optimizer

    def record(self, groups, betas):
        opt = original(self, groups, betas)
        seen.append(opt)
        return opt

    monkeypatch.setattr(training.NMHooks, "optimizer", record)
    return seen


def test_cast_trains_with_adams_and_ends_exactly_2_4(nm_dirs, text_file, tmp_path, optimizers):
    result = train(_cfg(nm_dirs["cast"], text_file, tmp_path / "run"))
    assert len(optimizers) == 1 and isinstance(optimizers[0], AdamS)
    groups = {g["name"]: g for g in optimizers[0].param_groups}
    assert groups["decay:nm"]["nm_mode"] == "cast" and len(groups["decay:nm"]["params"]) == 6
    assert groups["nm_scale"]["initial_lr"] == pytest.approx(groups["decay"]["initial_lr"])  # scale_lr_mult 1
    rows = _metrics(tmp_path / "run")
    mass = [r["nm_pruned_mass"] for r in rows if "nm_pruned_mass" in r]
    assert len(mass) == 2 and mass[-1] < mass[0]  # AdamS pulls the to-be-pruned weights down
    assert rows[-1]["nm_decay_a"] == 1.0 and result.losses[8] < result.losses[1]
    model = upcycle.load(result.model_dir)
    assert exactness(model)["exact"] and model.config.upcycle["nm"]["pruned"] is True
    assert not any("nm_scale" in k for k in model.state_dict())  # folded into the weights
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert "parent recorded" in info["teacher"]["path"]  # N:M has no dense form: the recorded `source`


def test_weight_scales_fold_into_the_same_function():
    model = tiny_model("llama", vocab_size=64)
    upcycle.convert(model, upcycle.NMSparseConfig(method="cast", targets=["ffn", "attention"]))
    hooks = training.train_hooks(model, training.NMSparseTraining())
    with torch.no_grad():
        for lin in hooks.linears.values():
            lin.nm_scale.uniform_(0.5, 1.5)
    ids = torch.randint(0, 64, (1, 9))
    with torch.no_grad():
        before = model(ids).logits
        for lin in hooks.linears.values():
            training.fold_scales(lin)
        after = model(ids).logits
    assert torch.allclose(before, after, atol=1e-5)
    assert not any("nm_scale" in n for n, _ in model.named_parameters())


def test_srste_trains_the_sparse_function_and_ends_exact(nm_dirs, text_file, tmp_path, optimizers):
    srste = train(_cfg(nm_dirs["srste"], text_file, tmp_path / "srste"))
    assert [g["nm_mode"] for g in optimizers[0].param_groups if g["nm_mode"]] == ["srste"]
    fixed = train(_cfg(nm_dirs["magnitude"], text_file, tmp_path / "fixed"))
    assert optimizers[1] is None  # a one-shot model fine-tunes with AdamW, its zeros re-applied
    # the first forward of SR-STE is the magnitude-pruned model: the same loss as the fixed-mask run's
    assert srste.losses[1] == pytest.approx(fixed.losses[1], abs=1e-6)
    assert exactness(upcycle.load(srste.model_dir))["exact"]


def test_a_one_shot_model_keeps_its_zeros_exactly(nm_dirs, text_file, tmp_path):
    before = upcycle.load(nm_dirs["magnitude"])
    result = train(_cfg(nm_dirs["magnitude"], text_file, tmp_path / "run", weight_decay=0.1))
    after = upcycle.load(result.model_dir)
    cfg = upcycle.NMSparseConfig()
    for (name, a), b in zip(targets(after, cfg).items(), targets(before, cfg).values(), strict=True):
        assert torch.equal(a.weight == 0, b.weight == 0), name  # the same zeros, not just "still 2:4"
        assert not torch.equal(a.weight, b.weight), name  # and the kept weights trained


def test_cast_resumes_to_the_same_run(nm_dirs, text_file, tmp_path):
    """Ctrl-C at step 3 and --resume: AdamS's moments and masks (optimizer state), the weight scales (parameters)
    and the ramp continue where they were: the same losses and the same final model as one uninterrupted run."""
    kw = dict(steps=6, cast_ramp_steps=6, mask_refresh_every=2, lr_warmup_steps=2)
    whole = train(_cfg(nm_dirs["cast"], text_file, tmp_path / "whole", **kw))

    def ctrl_c_at_3(step, record):
        if step == 3:
            signal.raise_signal(signal.SIGINT)

    cfg = _cfg(nm_dirs["cast"], text_file, tmp_path / "cut", **kw)
    first = train(cfg, on_step=ctrl_c_at_3)
    assert first.interrupted and first.step == 3
    rest = train(cfg.replace(resume=True))
    assert {**first.losses, **rest.losses} == whole.losses
    a, b = upcycle.load(whole.model_dir).state_dict(), upcycle.load(rest.model_dir).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_dense_model_converts_on_the_fly_and_frozen_targets_are_refused(dense_dir, text_file, tmp_path):
    result = train(_cfg(dense_dir, text_file, tmp_path / "fly", steps=2, recipe={"name": "nm"}, method="cast"))
    model = upcycle.load(result.model_dir)
    assert exactness(model)["exact"] and model.config.upcycle["nm"]["method"] == "cast"
    with pytest.raises(ValueError, match="targeted weights are trainable"):
        train(_cfg(dense_dir, text_file, tmp_path / "frozen", steps=2, method="cast", targets="attention",
                   train_only="ffn"))
    with pytest.raises(ValueError, match="needs calibration data"):
        train(_cfg(dense_dir, text_file, tmp_path / "wanda", steps=2, method="wanda"))
