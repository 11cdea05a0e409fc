"""Training an MoE checkpoint with `upcycle.train` and the recipe's hooks: the aux losses by name, the router LR
group, per-layer routing metrics, the dead-expert warning, the expert-load heatmap; the layer's bookkeeping."""

import json
import logging

import pytest
import torch

import upcycle
from upcycle.recipes.moe import MoESwiGLU, MoEUpcycleConfig, moe_aux_loss, moe_ffns, set_router_recording
from upcycle.recipes.moe.routing import load_balance_loss, route, z_loss
from upcycle.recipes.moe.training import MoETraining, train_hooks
from upcycle.train import train
from upcycle.train.config import TrainConfig

from .conftest import make_parent


def _layer(**kw) -> MoESwiGLU:
    torch.manual_seed(0)
    m = MoESwiGLU(32, 16, MoEUpcycleConfig(num_experts=4, top_k=2, **kw))
    m.reset_parameters(std=0.3)
    return m


def test_aux_losses_come_from_the_last_forward_logits():
    m = _layer().train()
    x = torch.randn(3, 5, 32)
    m(x)
    logits = m.gate(x.reshape(-1, 32))
    _, idx, probs = route(logits, 2)
    got = m.aux_losses()
    torch.testing.assert_close(got["load_balance"], load_balance_loss(probs, idx))
    torch.testing.assert_close(got["z_loss"], z_loss(logits))
    (g,) = torch.autograd.grad(got["load_balance"] + got["z_loss"], m.gate.weight)
    assert g.abs().sum() > 0
    stats = m.routing_stats()
    assert set(stats) == {"load", "max_violation", "dead_experts", "entropy", "entropy_norm"}
    assert stats["load"].sum().item() == pytest.approx(1.0)


def test_eval_mode_records_only_when_asked():
    m = _layer().eval()
    m(torch.randn(4, 32))
    assert m.aux_losses() == {}  # what the trainer's Objective sees outside begin_aux / end_aux
    with pytest.raises(RuntimeError, match="record_router"):
        m.routing_stats()
    m.record_router = True
    m(torch.randn(4, 32))
    assert set(m.aux_losses()) == {"load_balance", "z_loss"}


def test_jitter_only_perturbs_the_training_router():
    m = _layer(router_jitter=0.5)
    x = torch.randn(64, 32)
    m.eval()
    torch.testing.assert_close(m(x), m(x))
    m.train()
    torch.manual_seed(1)
    a = m(x)
    torch.manual_seed(2)
    assert (a - m(x)).abs().max() > 0


def test_model_aux_loss_for_your_own_loop():
    model = upcycle.convert(make_parent("llama"), MoEUpcycleConfig(num_experts=4, top_k=2), progress=False).train()
    out = model(torch.randint(0, 512, (2, 8)))
    aux = moe_aux_loss(model)
    layers = [m for _, m in moe_ffns(model)]
    expected = sum(1e-2 * m.aux_losses()["load_balance"] + 1e-3 * m.aux_losses()["z_loss"] for m in layers) / 2
    torch.testing.assert_close(aux, expected)
    (out.logits.mean() + aux).backward()
    assert all(m.gate.weight.grad is not None for m in layers)
    set_router_recording(model, False)
    model(torch.randint(0, 512, (1, 4)))
    with pytest.raises(RuntimeError, match="recorded no router state"):
        moe_aux_loss(model)


def test_hooks_router_group_and_weights_from_the_config(moe_dir, text_file, tmp_path):
    from upcycle.train.loop import build_optimizer
    from upcycle.train.objective import Objective

    model = upcycle.load(moe_dir)
    hooks = train_hooks(model, MoETraining(router_lr_mult=5.0, z_loss_weight=0.0))
    assert hooks.aux_weights(0) == {"load_balance": 0.01}  # the checkpoint's aux_loss_coef; z-loss off
    cfg = TrainConfig(model=str(moe_dir), data=[str(text_file)], out=str(tmp_path), lr=1e-3)
    groups = {g["name"]: g for g in build_optimizer(Objective(model), cfg, hooks).param_groups}
    assert groups["router"]["lr"] == pytest.approx(5e-3) and groups["router"]["weight_decay"] == 0.0
    assert len(groups["router"]["params"]) == 2  # one router per MoE layer
    with pytest.raises(ValueError, match="--router-lr-mult"):
        MoETraining(router_lr_mult=0.0)


def _rows(run) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_training_logs_aux_losses_by_name_and_routing_metrics_and_draws_the_heatmap(moe_dir, text_file, tmp_path,
                                                                                    tiny_train_config, caplog):
    cfg = tiny_train_config(moe_dir, [text_file], tmp_path / "run", steps=12, batch_size=8, distill_weight=0.5,
                            router_lr_mult=2.0, dead_expert_steps=5)
    with caplog.at_level(logging.WARNING, logger="upcycle.train"):
        result = train(cfg)
    losses = list(result.losses.values())
    assert sum(losses[-3:]) / 3 < losses[0] - 0.3, losses
    rows = _rows(tmp_path / "run")
    for r in rows:
        assert r["load_balance_weight"] == 0.01 and r["z_loss_weight"] == 0.001
        assert 0.9 < r["load_balance"] < 4 and r["z_loss"] > 0  # 1.0: perfect balance, 4 = E: collapsed
        moe = r["moe"]
        assert moe["layers"] == [0, 1] and all(len(load) == 4 and abs(sum(load) - 1) < 1e-4 for load in moe["load"])
        assert r["moe_max_violation"] == max(moe["max_violation"]) and 0 < r["moe_router_entropy"] <= 1
    png = tmp_path / "run" / "expert_load.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    model = upcycle.load(result.model_dir)
    assert [m.num_experts for _, m in moe_ffns(model)] == [4, 4]


def test_a_dead_expert_is_warned_about_once(moe_dir, text_file, tmp_path, tiny_train_config, caplog, monkeypatch):
    original = MoESwiGLU.router_logits

    def starve_last(self, x):  # the last expert never wins a token
        logits = original(self, x)
        return torch.cat([logits[:, :-1], logits[:, -1:] - 1e4], dim=1)

    monkeypatch.setattr(MoESwiGLU, "router_logits", starve_last)
    cfg = tiny_train_config(moe_dir, [text_file], tmp_path / "run", steps=4, batch_size=2, distill_weight=0.0,
                            dead_expert_steps=3, load_balance_weight=0.0, z_loss_weight=0.0)
    with caplog.at_level(logging.WARNING, logger="upcycle.train"):
        train(cfg)
    dead = [r.getMessage() for r in caplog.records if "dead experts" in r.getMessage()]
    assert len(dead) == 2 and all("expert(s) [3]" in m and "--load-balance-weight" in m for m in dead), dead
    rows = _rows(tmp_path / "run")
    assert all(r["moe_dead_experts"] == 2 and r["moe"]["load"][0][3] == 0 for r in rows)
    assert all("load_balance_weight" not in r for r in rows)  # weights 0: no aux loss added or logged


def test_a_dense_model_converts_on_the_fly_from_flags(dense_dir, text_file, tmp_path):
    from upcycle.cli import main

    out = tmp_path / "run"
    assert main(["train", "--model", str(dense_dir), "--data", str(text_file), "--out", str(out), "--num-experts", "2",
                 "--top-k", "1", "--steps", "2", "--seq-len", "32", "--batch-size", "2", "--no-progress",
                 "--no-tensorboard", "--num-threads", "1", "--gradient-checkpointing"]) == 0
    info = json.loads((out / "run_info.json").read_text())
    assert info["recipe"] == "moe" and info["teacher"]["path"] == str(dense_dir)
    assert [m.num_experts for _, m in moe_ffns(upcycle.load(out / "model"))] == [2, 2]
    assert main(["train", "--model", str(dense_dir), "--data", str(text_file), "--out", str(tmp_path / "bad"),
                 "--num-experts", "2", "--top-k", "3"]) == 2


def test_train_only_ffn_warns_that_it_does_not_reach_the_moe_layers(dense_dir, tokenizer, text_file, tmp_path,
                                                                    tiny_train_config, caplog):
    model = upcycle.convert(upcycle.load(dense_dir), MoEUpcycleConfig(num_experts=2, top_k=1, layers=[1]),
                            progress=False)
    src = upcycle.save(model, tmp_path / "half", tokenizer=tokenizer)
    cfg = tiny_train_config(src, [text_file], tmp_path / "run", steps=1, batch_size=2, distill_weight=0.0,
                            train_only="ffn")
    with caplog.at_level(logging.WARNING, logger="upcycle.train"):
        train(cfg)
    assert any("--train-only all" in r.getMessage() for r in caplog.records)


def test_distillation_needs_the_recorded_parent_or_a_teacher(dense_dir, tokenizer, text_file, tmp_path,
                                                             tiny_train_config):
    """An MoE model has no dense form: the teacher is the parent `upcycle convert` recorded, else --teacher."""
    model = upcycle.convert(upcycle.load(dense_dir), MoEUpcycleConfig(num_experts=2, top_k=1), progress=False)
    src = upcycle.save(model, tmp_path / "python-api", tokenizer=tokenizer)  # no `source` recorded
    cfg = tiny_train_config(src, [text_file], tmp_path / "run", steps=1, batch_size=2, distill_weight=0.5)
    with pytest.raises(ValueError, match="pass --teacher DENSE_DIR"):
        train(cfg)
    result = train(cfg.replace(teacher=str(dense_dir), out=str(tmp_path / "run2")))
    assert json.loads((tmp_path / "run2" / "run_info.json").read_text())["teacher"]["path"] == str(dense_dir)
    assert result.model_dir is not None
