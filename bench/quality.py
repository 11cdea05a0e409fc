"""Quality table: every recipe from one dense base model, same bank layout, same token budget.

Runs the demo pipeline (`upcycle.demo.run_demo`) on two kinds of text: Python source (the stdlib,
offline everywhere) and English prose (../shared/data WikiText-2 + TinyStories, when present: each
file's last 15% is held out). Writes bench/results/quality.md, quality.json and quality-<corpus>.png.

    python bench/quality.py                 # ~20 min on 2 CPU cores
    python bench/quality.py --quick         # ~5 min, smaller budgets
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import platform
import shutil
import tempfile
from pathlib import Path

from upcycle.demo import DemoConfig, format_table, run_demo

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
BASELINES = ["posthoc-magnitude", "posthoc-threshold", "global-topk", "posthoc-svd", "posthoc-predictor"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--corpora", default="code,prose")
    ap.add_argument("--pretrain-steps", type=int, default=None)
    ap.add_argument("--train-steps", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--results", default="bench/results")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    overrides = {k: v for k, v in {"pretrain_steps": args.pretrain_steps, "train_steps": args.train_steps,
                                    "threads": args.threads}.items() if v is not None}
    reports = {}
    for corpus in args.corpora.split(","):
        files = None
        if corpus == "prose":
            files = [str(SHARED / "wikitext-2-raw-test.txt"), str(SHARED / "tinystories-val.txt")]
            if not all(Path(f).exists() for f in files):
                print(f"skipping prose: {SHARED} is absent (the team's shared/data folder)")
                continue
        with tempfile.TemporaryDirectory() as tmp:
            base = DemoConfig.quick(tmp) if args.quick else DemoConfig(out=tmp)
            cfg = dataclasses.replace(base, text_files=files, baselines=BASELINES, **overrides)
            report = run_demo(cfg)
            shutil.copy(Path(tmp) / "report.png", results / f"quality-{corpus}.png")
        for k in ("checkpoints",):
            report.pop(k)
        reports[corpus] = report
        print(format_table(report))

    cmd = "python bench/quality.py" + (" --quick" if args.quick else "") + "".join(
        f" --{k.replace('_', '-')} {v}" for k, v in overrides.items())
    device = f"CPU {platform.processor() or platform.machine()}"
    (results / "quality.json").write_text(json.dumps({"command": cmd, "device": device, "reports": reports}, indent=2))
    lines = ["# Quality: bank-sparse 16-of-64 recipes vs dense, same base model, same token budget", "",
             f"Command: `{cmd}` ({device}). Perplexity on held-out text, non-overlapping windows of "
             "seq_len tokens; `recall`: fraction of the oracle top-16-of-64 (by |h|) channels the routing keeps; "
             "`ffn density` as measured at the down_proj input.", ""]
    for corpus, r in reports.items():
        c = r["config"]
        lines += [f"## {corpus}: {r['eval']['data']}", "",
                  f"Dense model: d={c['hidden_size']}, {c['num_layers']} layers, d_ff={c['intermediate_size']}, "
                  f"pretrained {r['pretrain']['tokens']:,} tokens (loss {r['pretrain']['loss_last']:.3f}); "
                  f"continual training {c['train_steps']} steps, distillation weight {c['distill_weight']}; "
                  f"eval seq_len {c['seq_len']}, {c['eval_windows']} windows per set; total {r['seconds']:.0f} s.", "",
                  "| method | " + " | ".join(f"ppl {s}" for s in r["rows"][0]["ppl_by_data"])
                  + " | ppl / dense | FFN density | recall | training tokens |",
                  "|---|" + "---|" * (len(r["rows"][0]["ppl_by_data"]) + 4)]
        for row in r["rows"]:
            ppl = " | ".join(f"{v:.3f}" for v in row["ppl_by_data"].values())
            rec = "-" if row.get("recall") is None else f"{row['recall']:.3f}"
            lines.append(f"| {row['method']} | {ppl} | {row['ppl_vs_dense']:.3f} | {row['ffn_density']:.3f} | "
                         f"{rec} | {row['train_tokens']:,} |")
        lines += ["", f"![{corpus}](quality-{corpus}.png)", "", f"Sample from the upcycled model: "
                  f"`{r['sample']['text'][:200]!r}`", ""]
    (results / "quality.md").write_text("\n".join(lines))
    print(f"wrote {results / 'quality.md'}")


if __name__ == "__main__":
    main()
