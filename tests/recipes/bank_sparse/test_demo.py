import json

import upcycle


def test_demo_end_to_end_micro(tmp_path, capsys):
    out = tmp_path / "demo"
    from upcycle.recipes.bank_sparse import demo

    cfg = demo.DemoConfig(out=str(out), train_bytes=150_000, heldout_bytes=40_000, vocab_size=300, hidden_size=64,
                          intermediate_size=128, num_layers=2, seq_len=64, pretrain_steps=4, batch_size=4,
                          calib_tokens=512, calib_steps=5, train_steps=3, eval_windows=2, curve_points=1)
    report = demo.run_demo(cfg)
    saved = json.loads((out / "report.json").read_text())
    assert [r["method"] for r in saved["rows"]] == ["dense", "posthoc-magnitude", "posthoc-predictor", "upcycled",
                                                    "dense-continued"]
    rows = {r["method"]: r for r in saved["rows"]}
    assert rows["dense"]["ffn_density"] == 1.0
    for m in ("posthoc-magnitude", "posthoc-predictor", "upcycled"):
        assert abs(rows[m]["ffn_density"] - 0.25) < 1e-6
    assert rows["posthoc-magnitude"]["recall"] == 1.0
    assert all(r["ppl"] > 1 for r in saved["rows"])
    assert (out / "report.png").stat().st_size > 0
    assert report["sample"]["text"].startswith(report["sample"]["prompt"].strip()[:6])
    sparse = upcycle.load(saved["checkpoints"]["upcycled"])
    assert sum(1 for n, _ in sparse.named_parameters() if ".predictor." in n) > 0
    assert "upcycled" in demo.format_table(report)


def test_demo_cli_flags_parse():
    from upcycle.cli import build_parser

    args = build_parser().parse_args(["demo", "--out", "x", "--quick", "--no-control", "--train-steps", "7"])
    assert args.quick and not args.control and args.train_steps == 7


def test_toy_quick_cli_path(tmp_path, monkeypatch, capsys):
    """`upcycle demo --toy --quick` through the CLI, with the quick config shrunk to test size (the real quick
    config's minutes are measured by hand, see README)."""
    from upcycle.cli import main
    from upcycle.recipes.bank_sparse import demo

    tiny = dict(train_bytes=150_000, heldout_bytes=40_000, vocab_size=300, hidden_size=64, intermediate_size=128,
                num_layers=2, seq_len=64, pretrain_steps=4, batch_size=4, calib_tokens=512, calib_steps=5,
                train_steps=3, eval_windows=2, curve_points=1)
    calls = []

    def quick(out="demo"):
        calls.append(out)
        return demo.DemoConfig(out=out, **tiny)

    monkeypatch.setattr(demo.DemoConfig, "quick", staticmethod(quick))
    out = tmp_path / "demo"
    assert main(["demo", "--toy", "--quick", "--out", str(out)]) == 0
    assert calls == [str(out)]
    saved = json.loads((out / "report.json").read_text())
    assert {r["method"] for r in saved["rows"]} >= {"dense", "upcycled", "dense-continued"}
    assert "upcycled" in capsys.readouterr().out
