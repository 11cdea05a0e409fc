"""`upcycle convert --recipe moe`, `upcycle info` and `upcycle eval` on MoE checkpoints; bad flags exit 2 with one
line naming the fix."""

import json

import pytest
import torch

import upcycle
from upcycle.cli import build_parser, main
from upcycle.recipes.moe import moe_layers


def test_convert_help_groups_the_flags_under_the_recipe_with_every_default(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["convert", "--help"])
    text = capsys.readouterr().out
    group = text[text.index("moe recipe (--recipe moe)"):]
    for flag, default in [("--num-experts", "(8)"), ("--top-k", "(2)"), ("--moe-init", "(copy)"),
                          ("--split-by", "(contiguous)"), ("--granularity", "(1)"), ("--shared-experts", "(0)"),
                          ("--router ", "(softmax_topk)"), ("--norm-topk-prob", "(True)"), ("--weight-scaling",
                          "(exact)"), ("--expert-scale", "(None)"), ("--drop-upcycle", "(0.0)"),
                          ("--moe-layers", "(all)"),
                          ("--router-init ", "(random)"), ("--router-init-std", "(0.02)"), ("--router-jitter",
                          "(0.0)"), ("--aux-loss-coef", "(0.01)"), ("--z-loss-coef", "(0.001)")]:
        at = group.index(flag)
        assert default in " ".join(group[at: group.find("\n  --", at + 1)].split()), flag


def test_convert_info_and_eval_an_moe_checkpoint(dense_dir, text_file, tmp_path, capsys):
    out = tmp_path / "moe"
    assert main(["convert", "--recipe", "moe", "--model", str(dense_dir), "--out", str(out), "--num-experts", "4",
                 "--top-k", "1", "--moe-init", "split", "--split-by", "cluster", "--router-init", "calibrate",
                 "--moe-layers", "every:2", "--data", str(text_file), "--calib-tokens", "2048", "--seq-len", "64",
                 "--seed", "3"]) == 0
    assert "MoE (1/2 FFN layers: 4 experts of 64 top-1" in capsys.readouterr().out
    model = upcycle.load(out)
    assert sorted(moe_layers(model)) == [1] and moe_layers(model)[1].config.seed == 3
    meta = json.loads((out / "config.json").read_text())["upcycle"]
    assert meta["recipe"] == "moe" and meta["source"] == str(dense_dir.resolve())

    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    moe, dense = info["layers"][1], info["layers"][0]
    assert info["recipe"] == "moe" and moe["moe"] and not dense["moe"]
    assert (moe["num_experts"], moe["top_k"], moe["expert_size"]) == (4, 1, 64)
    assert moe["active_ffn_params_per_token"] == 4 * 64 + 3 * 64 * 64  # router + one expert of 64 channels
    n_moe = sum(p.numel() for p in moe_layers(model)[1].parameters())
    assert moe["total_ffn_params"] == n_moe and dense["total_ffn_params"] == 3 * 64 * 256
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "experts=4 top_k=1 init=split" in text and "active per token" in text

    assert main(["eval", "--model", str(out), "--data", str(text_file), "--seq-len", "64", "--max-windows", "3",
                 "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["ppl"] > 1 and r["sparsity"]["recipe"] == "moe" and r["sparsity"]["moe_layers"] == [1]
    layer = {x["layer"]: x for x in r["stats"]["layers"]}
    assert layer[0]["density"] == 1.0 and layer[0]["expert_load"] is None
    assert len(layer[1]["expert_load"]) == 4 and sum(layer[1]["expert_load"]) == pytest.approx(1.0)
    assert layer[1]["tokens"] == 3 * 64
    assert layer[1]["active_ffn_params_per_token"] == moe["active_ffn_params_per_token"]
    assert r["stats"]["active_ffn_params_per_token"] == moe["active_ffn_params_per_token"] + 3 * 64 * 256
    assert main(["eval", "--model", str(out), "--data", str(text_file), "--seq-len", "64", "--max-windows", "2"]) == 0
    text = capsys.readouterr().out
    assert "MoE (1/2 FFN layers" in text and "MoE routing" in text and "load per expert" in text


def test_long_context_tasks_run_on_an_moe_checkpoint(moe_dir, capsys):
    assert main(["eval", "--model", str(moe_dir), "--task", "niah", "--lengths", "700", "--samples", "1",
                 "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    (by_len,) = r["tasks"].values()
    res = by_len["700"]
    assert 0 <= res["score"] <= 1 and res["ffn_density"] == pytest.approx(0.5, abs=0.01)  # top-2 of 4 copies
    assert [len(x["expert_load"]) for x in res["layers"]] == [4, 4]


def test_bad_inputs_exit_2_with_one_line(dense_dir, tmp_path, capsys):
    base = ["convert", "--recipe", "moe", "--model", str(dense_dir), "--out", str(tmp_path / "o")]
    cases = [
        (["--num-experts", "4", "--top-k", "5"], "set top_k <= num_experts"),
        (["--moe-init", "split", "--num-experts", "5", "--top-k", "1"], "d_ff=256 is not divisible into 5 slices"),
        (["--moe-init", "split", "--num-experts", "4", "--split-by", "cluster"], "needs --data"),
        (["--moe-layers", "every:x"], "expected all, every:K"),
        (["--moe-layers", "9"], "indices [9] >= num_layers=2"),
        (["--moe-init", "granular"], "granularity >= 2"),
        (["--router", "topk_softmax", "--no-norm-topk-prob"], "set norm_topk_prob=True"),
        (["--drop-upcycle", "nan"], "must be a finite number"),
    ]
    for argv, message in cases:
        assert main(base + argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, (argv, err)
    assert not (tmp_path / "o").exists()


def test_train_help_lists_the_moe_flags(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = capsys.readouterr().out
    group = text[text.index("moe recipe (--recipe moe)"):]
    for flag in ("--num-experts", "--top-k", "--router-lr-mult", "--load-balance-weight", "--z-loss-weight",
                 "--dead-expert-steps"):
        assert flag in group


def test_eval_stats_count_the_routed_tokens(moe_dir):
    from upcycle.eval.stats import stats_for

    model = upcycle.load(moe_dir)
    with stats_for(model) as st, torch.no_grad():
        model(torch.randint(0, 100, (2, 10)))
    s = st.summary()
    assert [x["tokens"] for x in s["layers"]] == [20, 20]
    assert all(sum(x["expert_load"]) == pytest.approx(1.0) for x in s["layers"])
    assert s["ffn_density"] == pytest.approx(s["active_ffn_params_per_token"] / s["total_ffn_params"])
