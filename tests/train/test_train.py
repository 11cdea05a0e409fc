import json
import signal

import pytest
import torch

import upcycle
from upcycle.recipes.bank_sparse.modules import sparse_ffns
from upcycle.train import train


def test_training_lowers_the_loss_and_saves_a_loadable_model(sparse_dir, text_file, tmp_path, tiny_train_config):
    cfg = tiny_train_config(sparse_dir, [text_file], tmp_path / "run", steps=30, batch_size=8, eval_every=15,
                            keep_warmup_steps=10, distill_weight=0.0)
    result = train(cfg)
    losses = list(result.losses.values())
    assert len(losses) == 30 and not result.interrupted
    assert sum(losses[-5:]) / 5 < losses[0] - 0.7, losses  # ~6.2 -> ~5 on the random-init tiny model
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 31))
    assert {"step", "loss", "lr", "keep", "tokens"} <= set(rows[0])
    assert rows[0]["keep"] == 64 and rows[-1]["keep"] == 16 and rows[-1]["tokens"] == 30 * 8 * 64
    assert rows[-1]["val_loss"] < rows[14]["val_loss"]
    assert (tmp_path / "run" / "loss_curve.png").stat().st_size > 1000
    model = upcycle.load(result.model_dir)
    assert [m.keep for _, m in sparse_ffns(model)] == [16, 16]
    ids = torch.randint(0, 512, (1, 16))
    assert torch.isfinite(model(ids).logits).all()


@pytest.mark.parametrize("model", ["sparse_dir", "shadow_dir"])
def test_ctrl_c_checkpoints_and_resume_reproduce_the_uninterrupted_run(model, text_file, tmp_path, tiny_train_config,
                                                                       request):
    # Everything with state: keep warm-up, LR warm-up + cosine, distillation, decaying aux term (low-rank),
    # gradient accumulation, data order; the shadow's cached clipping factors (no evaluation at the cut, which
    # would refit them in both runs alike).
    sparse_dir = request.getfixturevalue(model)
    aux = dict(aux_weight=0.1, aux_steps=4) if model == "sparse_dir" else {}
    kw = dict(steps=6, keep_warmup_steps=4, keep_schedule="cosine", lr_warmup_steps=2, distill_weight=0.5,
              grad_accum=2, batch_size=2, eval_every=3 if aux else 4, **aux)
    full = train(tiny_train_config(sparse_dir, [text_file], tmp_path / "full", **kw))

    def ctrl_c_at_3(step, record):
        if step == 3:
            signal.raise_signal(signal.SIGINT)  # what a terminal's Ctrl-C delivers

    cfg = tiny_train_config(sparse_dir, [text_file], tmp_path / "cut", **kw)
    first = train(cfg, on_step=ctrl_c_at_3)
    assert first.interrupted and first.step == 3 and first.model_dir is None
    assert (tmp_path / "cut" / "checkpoints" / "step_00000003" / "trainer_state.json").exists()
    with pytest.raises(ValueError, match="--resume"):
        train(cfg)  # refuses to overwrite a run silently
    second = train(cfg.replace(resume=True))
    assert list(second.losses) == [4, 5, 6]
    # bit-identical: same data position, optimizer moments, LR, keep and RNG after the restart
    assert {**first.losses, **second.losses} == full.losses
    assert second.val_loss == full.val_loss
    read = lambda run: [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("tokens_per_s",)} for r in rows]  # noqa: E731
    assert strip(read("cut")) == strip(read("full"))
    a, b = upcycle.load(full.model_dir).state_dict(), upcycle.load(second.model_dir).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cli_with_yaml_config_trains_a_dense_checkpoint_converted_on_the_fly(dense_dir, text_file, tmp_path):
    from upcycle.cli import main

    y = tmp_path / "train.yaml"
    y.write_text(f"model: {dense_dir}\ndata: [{text_file}]\nout: {tmp_path / 'run'}\nbank_size: 64\nkeep: 32\n"
                 "steps: 2\nseq_len: 32\nbatch_size: 2\nprogress: false\ntensorboard: false\nnum_threads: 1\n")
    assert main(["train", "--config", str(y), "--gradient-checkpointing", "--distill-weight", "0.5"]) == 0
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert info["sparse"] and info["teacher"]["param_bytes"] > 0
    assert [m.target_keep for _, m in sparse_ffns(upcycle.load(tmp_path / "run" / "model"))] == [32, 32]
    assert main(["train", "--config", str(y), "--data", str(tmp_path / "missing.txt"),
                 "--out", str(tmp_path / "run2")]) == 2


def test_shadow_predictor_model_trains_with_feature_distillation_and_on_eval(dense_dir, tokenizer, text_file,
                                                                             tmp_path, tiny_train_config):
    model = upcycle.load(dense_dir)
    upcycle.convert(model, upcycle.BankSparseConfig(predictor="shadow", predictor_budget=0.2), progress=False)
    src = upcycle.save(model, tmp_path / "shadow", tokenizer=tokenizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []

    def on_eval(step, m):
        assert not m.training and not torch.is_grad_enabled()
        seen.append(step)
        return {"custom": float(step)}

    cfg = tiny_train_config(src, [text_file], tmp_path / "run", steps=4, eval_every=2, feature_distill_weight=1.0)
    result = train(cfg, on_eval=on_eval)
    assert seen == [2, 4]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["custom"] == 2.0 and all(r["feat"] > 0 for r in rows)
    trained = upcycle.load(result.model_dir)
    assert {m.predictor.kind for _, m in sparse_ffns(trained)} == {"shadow"}
    after = trained.state_dict()
    assert not torch.equal(after["model.layers.0.mlp.up_proj.weight"], before["model.layers.0.mlp.up_proj.weight"])
