"""`upcycle diagnose` and `upcycle repair` on the tiny checkpoints: outputs, the auto layer, bad input."""

from __future__ import annotations

import json

import pytest
import torch

import upcycle
from upcycle.cli import main
from upcycle.eval import tasks
from upcycle.recipes.bank_sparse import sparse_ffns


def layer_local_failure(layer: int, from_length: int, need_keep: int):
    """Stands in for greedy decoding (see tests/recipes/layer_repair): runs the prefill, answers right unless the
    model keeps fewer than `need_keep` channels per bank in `layer` and the sample is long."""

    def factory(model, tokenizer):
        def gen(sample):
            with torch.no_grad():
                model(tokenizer(sample.input_text, return_tensors="pt")["input_ids"])
            keeps = {m.layer_idx: m.keep for _, m in sparse_ffns(model)}
            ok = not keeps or keeps.get(layer, need_keep) >= need_keep or sample.length < from_length
            return " " + " ".join(sample.outputs) if ok else " no idea"

        return gen

    return factory


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    pass


@pytest.fixture
def diagnosed(tmp_path_factory, sparse_dir, dense_dir, monkeypatch, capsys):
    """`upcycle diagnose` with answers that fail at 500 tokens unless layer 1 is dense."""
    monkeypatch.setattr(tasks, "hf_generate_fn", layer_local_failure(layer=1, from_length=400, need_keep=32))
    out = tmp_path_factory.mktemp("diag") / "d"
    argv = ["diagnose", "--model", str(sparse_dir), "--reference", str(dense_dir), "--task", "passkey",
            "--lengths", "300,500", "--samples", "2", "--sweep", "all", "--kl-positions", "4", "--out", str(out)]
    assert main(argv) == 0
    return out, capsys.readouterr().out


def test_diagnose_outputs(diagnosed):
    out, stdout = diagnosed
    assert "layer 1 dense" in stdout and "verdict: " in stdout and "Layer 1" in stdout
    r = json.loads((out / "diagnosis.json").read_text())
    assert r["best_layer"] == 1 and r["layers"]["1"]["recovered"]["500"] == 1.0
    assert set(r["screen"]["0"]) == {"300", "500"} and r["reference"].endswith("model")
    assert (out / "heatmap.png").stat().st_size > 10_000


def test_repair_auto_from_the_diagnosis(diagnosed, sparse_dir, tmp_path, capsys):
    out, _ = diagnosed
    rep = tmp_path / "repaired"
    report = tmp_path / "report.json"
    assert main(["repair", "--model", str(sparse_dir), "--layer", "auto", "--diagnosis", str(out), "--method", "keep",
                 "--keep", "32", "--out", str(rep), "--report", str(report)]) == 0
    stdout = capsys.readouterr().out
    assert "keep 16 -> 32" in stdout and "+0.1250" in stdout
    r = json.loads(report.read_text())
    assert r["layer"] == 1 and r["before"] == {"300": 1.0, "500": 0.0} and r["after"] == {"300": 1.0, "500": 1.0}
    assert r["recovered"] == {"300": None, "500": 1.0}
    saved = json.loads((rep / "config.json").read_text())["upcycle"]
    assert saved["bank_sparse"]["keep_per_layer"] == {"1": 32} and saved["repairs"][0]["method"] == "keep"
    model = upcycle.load(rep)
    assert {m.layer_idx: m.keep for _, m in sparse_ffns(model)} == {0: 16, 1: 32}
    # a re-run of the diagnosis on the repaired model shows the recovery
    assert main(["diagnose", "--model", str(rep), "--task", "passkey", "--lengths", "300,500", "--samples", "2",
                 "--kl-positions", "0", "--out", str(tmp_path / "again"), "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["sparse"]["500"]["score"] == 1.0 and again["swept"] == [] and "costs less" in again["verdict"]


def test_repair_refit_and_dense(sparse_dir, text_file, tmp_path, capsys):
    assert main(["repair", "--model", str(sparse_dir), "--layer", "0", "--method", "refit", "--data", str(text_file),
                 "--seq-len", "128", "--refit-tokens", "1024", "--steps", "5", "--no-eval", "--out",
                 str(tmp_path / "refit"), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["method"] == "refit" and r["refit"]["tokens"] > 0 and r["ffn_density_increase"] == 0
    assert "before" not in r
    assert main(["repair", "--model", str(sparse_dir), "--layer", "1", "--method", "dense", "--task", "niah",
                 "--lengths", "600", "--samples", "1", "--out", str(tmp_path / "dense"), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["keep_after"] == 64 and set(r["before"]) == set(r["after"]) == {"600"}
    assert r["ffn_density_after"] == pytest.approx(0.625)


@pytest.mark.parametrize("argv,message", [
    (["diagnose", "--model", "{dense}", "--out", "{tmp}/o"], "dense model, not a bank-sparse one"),
    (["diagnose", "--model", "{sparse}", "--reference", "{sparse}", "--out", "{tmp}/o"], "is a bank-sparse model"),
    (["diagnose", "--model", "{sparse}", "--lengths", "1024,4096", "--out", "{tmp}/o"],
     "4096 exceed the model's max_position_embeddings=2048"),
    (["diagnose", "--model", "{sparse}", "--layers", "0,9", "--out", "{tmp}/o"], "layer(s) 9 out of range"),
    (["diagnose", "--model", "{sparse}", "--sweep", "many", "--out", "{tmp}/o"], "--sweep"),
    (["diagnose", "--model", "{sparse}", "--task", "needle", "--out", "{tmp}/o"], "unknown task"),
    (["diagnose", "--model", "{sparse}", "--task", "niah_single_2", "--lengths", "1024", "--out", "{tmp}/o"],
     "--haystack"),
    (["diagnose", "--model", "{sparse}", "--out", "{sparse}/inside"], "inside the input"),
    (["repair", "--model", "{sparse}", "--layer", "auto", "--method", "keep", "--out", "{tmp}/o"], "--diagnosis"),
    (["repair", "--model", "{sparse}", "--layer", "7", "--method", "keep", "--no-eval", "--out", "{tmp}/o"],
     "out of range"),
    (["repair", "--model", "{sparse}", "--layer", "x", "--method", "keep", "--out", "{tmp}/o"], "--layer"),
    (["repair", "--model", "{sparse}", "--layer", "1", "--method", "refit", "--out", "{tmp}/o"], "--data"),
    (["repair", "--model", "{sparse}", "--layer", "1", "--method", "dense", "--keep", "8", "--out", "{tmp}/o"],
     "--keep"),
    (["repair", "--model", "{sparse}", "--layer", "1", "--method", "keep", "--keep", "65", "--no-eval", "--out",
      "{tmp}/o"], "must lie in"),
    (["repair", "--model", "{dense}", "--layer", "1", "--method", "keep", "--no-eval", "--out", "{tmp}/o"],
     "dense model, not a bank-sparse one"),
    (["repair", "--model", "{sparse}", "--layer", "1", "--method", "keep", "--diagnosis", "{tmp}/none", "--out",
      "{tmp}/o"], "no diagnosis.json"),
    (["repair", "--model", "{sparse}", "--layer", "1", "--method", "keep", "--no-eval", "--out", "{sparse}"],
     "is the input"),
])
def test_bad_input_is_one_line(argv, message, sparse_dir, dense_dir, tmp_path, capsys):
    argv = [a.format(sparse=sparse_dir, dense=dense_dir, tmp=tmp_path) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
