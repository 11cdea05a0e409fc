import json
import subprocess
import sys

import torch

import upcycle
from upcycle.cli import main
from upcycle.recipes.bank_sparse.modules import sparse_ffns


def test_convert_calibrate_then_load_and_info(dense_dir, text_file, tmp_path, capsys):
    out = tmp_path / "sparse"
    rc = main(["convert", "--model", str(dense_dir), "--out", str(out), "--data", str(text_file),
               "--calib-tokens", "4096", "--seq-len", "128", "--calib-steps", "20", "--keep-per-layer", "1=32"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "predictor recall" in printed and "mean" in printed
    model = upcycle.load(out)
    assert [m.keep for _, m in sparse_ffns(model)] == [16, 32]
    assert (out / "tokenizer.json").exists()  # carried along for train/eval
    assert json.loads((out / "config.json").read_text())["upcycle"]["source"] == str(dense_dir.resolve())

    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["recipe"] == "bank_sparse"
    assert [r["keep"] for r in info["layers"]] == [16, 32]
    n_pred = sum(p.numel() for n, p in model.named_parameters() if ".predictor." in n)
    assert info["predictor_params"] == n_pred
    assert abs(info["ffn_density"] - (0.25 + 0.5) / 2) < 1e-9
    assert main(["info", str(out)]) == 0
    assert "FFN bytes read per token" in capsys.readouterr().out


def test_convert_svd_default_without_data(dense_dir, tmp_path):
    assert main(["convert", "--model", str(dense_dir), "--out", str(tmp_path / "s"), "--rank", "8"]) == 0
    model = upcycle.load(tmp_path / "s")
    assert next(m for _, m in sparse_ffns(model)).predictor.rank == 8
    ids = torch.randint(0, 100, (1, 5))
    assert model(ids).logits.shape == (1, 5, model.config.vocab_size)


def test_bad_inputs_exit_2_with_one_line(dense_dir, tmp_path, capsys):
    cases = [
        (["convert", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o")], "not a checkpoint directory"),
        (["convert", "--model", str(dense_dir), "--out", str(tmp_path / "o"), "--bank-size", "48"],
         "not divisible by bank_size=48"),
        (["convert", "--model", str(dense_dir), "--out", str(tmp_path / "o"), "--keep", "70"], "keep=70"),
        (["convert", "--model", str(dense_dir), "--out", str(tmp_path / "o"), "--init", "calibrate"], "needs --data"),
        (["convert", "--model", str(dense_dir), "--out", str(tmp_path / "o"), "--data", str(tmp_path / "nope.txt")],
         "does not exist"),
        (["info", str(tmp_path / "missing")], "does not exist"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)
    assert not (tmp_path / "o").exists()


def test_console_entry_point(tmp_path):
    r = subprocess.run([sys.executable, "-m", "upcycle", "info", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 2 and "no config.json" in r.stderr


def test_predictor_budget_picks_a_shadow_and_info_counts_its_bytes(dense_dir, tmp_path, capsys):
    out = tmp_path / "shadow"
    assert main(["convert", "--model", str(dense_dir), "--out", str(out), "--predictor-budget", "0.2"]) == 0
    assert "predictor: shadow" in capsys.readouterr().out
    m = next(m for _, m in sparse_ffns(upcycle.load(out)))
    assert (m.predictor.kind, m.predictor.bits, m.predictor.group_size) == ("shadow", 4, 64)
    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    # the default shadow's routing parameter: a learned bias per channel (d_ff = 256, 2 layers), fp32 here
    assert info["predictor_params"] == 2 * 256
    # gate + up (2/3 of the FFN weights) at 4 bits + a 16-bit scale and minimum per 64 weights, + the bias
    assert abs(info["predictor_bytes_per_token"] - info["ffn_params"] * 2 / 3 * 4.5 / 8 - 2 * 256 * 4) < 1e-6
    assert main(["info", str(out)]) == 0
    assert "shadow 4-bit, groups of 64" in capsys.readouterr().out
