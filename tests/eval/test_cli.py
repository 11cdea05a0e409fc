from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from upcycle.cli import main


def _json(capsys, *argv) -> dict:
    assert main(["eval", *map(str, argv), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_dense_checkpoint_json(capsys, dense_dir, heldout_file):
    r = _json(capsys, "--model", dense_dir, "--data", heldout_file, "--seq-len", 64, "--max-windows", 3)
    assert r["ffn_density"] == 1.0 and r["ppl"] > 1 and r["sparsity"]["kind"] == "dense"
    p = r["perplexity"]
    assert (p["seq_len"], p["stride"], p["windows"], p["tokens_scored"]) == (64, 64, 3, 3 * 63)
    assert [layer["density"] for layer in r["stats"]["layers"]] == [1.0, 1.0]


def test_sparse_checkpoint_vs_reference(capsys, sparse_dir, dense_dir, heldout_file):
    args = ("--data", heldout_file, "--seq-len", 64, "--stride", 32, "--max-windows", 3)
    r = _json(capsys, "--model", sparse_dir, "--reference", dense_dir, *args)
    assert r["ffn_density"] == pytest.approx(0.25, abs=1e-6) and r["kl_ref"] > 0
    assert r["perplexity"]["tokens_scored"] == 63 + 32 + 32
    assert all(0 <= layer["recall"] <= 1 for layer in r["stats"]["layers"])
    dense = _json(capsys, "--model", dense_dir, "--reference", dense_dir, *args)
    assert dense["kl_ref"] == pytest.approx(0.0, abs=1e-6)


def test_baselines_on_the_fly(capsys, dense_dir, heldout_file, calib_file):
    args = ("--model", dense_dir, "--data", heldout_file, "--seq-len", 64, "--max-windows", 2)
    r = _json(capsys, *args, "--baseline", "posthoc-magnitude", "--keep", 8)
    assert r["stats"]["recall"] == pytest.approx(1.0) and r["ffn_density"] == pytest.approx(8 / 64)
    assert r["sparsity"]["baseline"] == "posthoc-magnitude"
    r = _json(capsys, *args, "--baseline", "posthoc-predictor", "--calib-data", calib_file, "--calib-steps", 5,
              "--calib-tokens", 512)
    assert r["ffn_density"] == pytest.approx(0.25)
    assert main(["eval", *map(str, args), "--baseline", "posthoc-threshold"]) == 2
    assert "--calib-data" in capsys.readouterr().err


def test_tasks_json_and_table(capsys, sparse_dir):
    r = _json(capsys, "--model", sparse_dir, "--task", "niah,passkey", "--lengths", "700,720", "--samples", 1)
    assert r["ppl"] is None and r["ffn_density"] == pytest.approx(0.25, abs=1e-6)
    assert set(r["tasks"]) == {"niah", "passkey"} and set(r["tasks"]["passkey"]) == {"700", "720"}
    assert 0 <= r["tasks"]["passkey"]["700"]["ruler_score"] <= 100
    assert len(r["tasks"]["niah"]["700"]["layers"]) == 2
    assert main(["eval", "--model", str(sparse_dir), "--task", "niah", "--lengths", "600", "--samples", "1"]) == 0
    out = capsys.readouterr().out
    assert "niah" in out and "score" in out


def test_human_table(capsys, sparse_dir, heldout_file):
    assert main(["eval", "--model", str(sparse_dir), "--data", str(heldout_file), "--seq-len", "64",
                 "--max-windows", "2"]) == 0
    out = capsys.readouterr().out
    assert "ppl" in out and "seq_len 64, stride 64" in out and "recall" in out and "  all  " in out


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--data", "/nonexistent/file.txt"], "does not exist"),
        (["--task", "needle"], "unknown task"),
        (["--task", "niah", "--lengths", "1k"], "--lengths"),
        (["--task", "niah_single_2"], "--haystack"),
        (["--task", "niah", "--lengths", "4096"], "max_position_embeddings=2048"),
        ([], "nothing to evaluate"),
        (["--data", "{heldout}", "--baseline", "magic"], "unknown baseline"),
    ],
)
def test_errors_are_one_line(capsys, dense_dir, heldout_file, extra, message):
    extra = [e.format(heldout=heldout_file) for e in extra]
    assert main(["eval", "--model", str(dense_dir), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_no_tokenizer(capsys, tmp_path, heldout_file):
    from upcycle.testing import tiny_model

    tiny_model("qwen2", vocab_size=64).save_pretrained(tmp_path / "m")
    assert main(["eval", "--model", str(tmp_path / "m"), "--data", str(heldout_file)]) == 2
    assert "no tokenizer" in capsys.readouterr().err


def test_progress_bars_with_the_warnings_before_the_work(dense_dir, heldout_file):
    # a real process: its stderr shows what a user sees, in order (pytest's log capture would take the warning)
    argv = ["eval", "--model", dense_dir, "--data", heldout_file, "--seq-len", 4096, "--max-windows", 1,
            "--task", "passkey", "--lengths", 512, "--samples", 2]
    r = subprocess.run([sys.executable, "-m", "upcycle", *map(str, argv)], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    err = r.stderr
    warned = err.index("--seq-len 4096 exceeds the model's max_position_embeddings 2048")
    assert warned < err.index("perplexity:") < err.index("tasks:")
    assert "1/1" in err[err.index("perplexity:"):err.index("tasks:")] and "2/2" in err[err.index("tasks:"):]
    assert "Use --seq-len <= 2048" in err and "ppl" in r.stdout and "exceeds" not in r.stdout
