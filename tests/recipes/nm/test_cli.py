"""`upcycle convert --recipe nm`, `upcycle info`, `upcycle eval` (checkpoints and --baseline) and bad input."""

from __future__ import annotations

import json

import upcycle
from upcycle.cli import main
from upcycle.recipes.nm import exactness


def test_convert_sparsegpt_with_data_then_info_and_eval(dense_dir, text_file, tmp_path, capsys):
    out = tmp_path / "nm"
    rc = main(["convert", "--model", str(dense_dir), "--out", str(out), "--recipe", "nm", "--method", "sparsegpt",
               "--data", str(text_file), "--calib-sequences", "8", "--calib-seq-len", "64", "--targets",
               "ffn,attention"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "every one exactly 2:4" in printed and "reconstruction error" in printed
    meta = json.loads((out / "config.json").read_text())["upcycle"]
    assert meta["recipe"] == "nm" and meta["source"] == str(dense_dir.resolve()) and meta["nm"]["pruned"]
    assert exactness(upcycle.load(out))["linears"] == 14

    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["recipe"] == "nm" and info["pattern"] == "2:4" and len(info["layers"]) == 2
    assert info["target_bytes_ratio"] == 0.53125  # fp32: half the values (0.5) + 2 bits per kept value (1/32)
    assert main(["info", str(out)]) == 0
    assert "every targeted weight exactly 2:4" in capsys.readouterr().out

    assert main(["eval", "--model", str(out), "--data", str(text_file), "--seq-len", "64", "--max-windows", "2",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["sparsity"]["recipe"] == "nm" and result["stats"]["weights"]["exact"]
    assert result["sparsity"]["weights"]["pattern"] == "2:4" and result["ffn_density"] == 1.0


def test_eval_baselines_prune_a_dense_model(dense_dir, text_file, capsys):
    for name in ("nm-magnitude", "wanda"):
        argv = ["eval", "--model", str(dense_dir), "--data", str(text_file), "--seq-len", "64", "--max-windows", "2",
                "--baseline", name, "--json"]
        if name == "wanda":
            argv += ["--calib-data", str(text_file), "--calib-tokens", "512"]
        assert main(argv) == 0, name
        result = json.loads(capsys.readouterr().out)
        assert result["sparsity"]["baseline"] in ("nm-magnitude", "nm-wanda")
        assert result["sparsity"]["weights"]["exact"] and result["sparsity"]["weights"]["linears"] == 6


def test_bad_inputs_exit_2_with_one_line(dense_dir, tmp_path, capsys):
    base = ["convert", "--model", str(dense_dir), "--out", str(tmp_path / "o"), "--recipe", "nm"]
    cases = [
        (base + ["--nm", "4:4"], "n=4 must be < m=4"),
        (base + ["--nm", "2-4"], "expected N:M"),
        (base + ["--nm", "1:3"], "not divisible by m=3"),
        (base + ["--method", "wanda"], "--method wanda needs calibration text"),
        (base + ["--method", "sparsegpt"], "needs calibration text: pass --data"),
        (base + ["--targets", "mlp"], "targets=['mlp']"),
        (["eval", "--model", str(dense_dir), "--data", str(dense_dir / "config.json"), "--baseline", "nm-sparsegpt"],
         "needs calibration text"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)
    assert not (tmp_path / "o").exists()
