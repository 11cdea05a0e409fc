"""Quality table: every recipe from one dense base model, same bank layout, same token budget.

Runs the demo pipeline (`upcycle.recipes.bank_sparse.demo.run_demo`) on two kinds of text: Python source (the stdlib,
offline everywhere) and English prose (../shared/data WikiText-2 + TinyStories, when present: each
file's last 15% is held out). Writes bench/results/quality.md, quality.json and quality-<corpus>.png.

    python bench/quality.py                 # ~20 min on 2 CPU cores
    python bench/quality.py --quick         # ~5 min, smaller budgets
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shutil
import tempfile
from pathlib import Path

import torch
from common import RESULTS, Table, machine_record, write_result

from upcycle.recipes.bank_sparse.demo import DemoConfig, format_table, run_demo

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
BASELINES = ["posthoc-magnitude", "posthoc-threshold", "global-topk", "posthoc-svd", "posthoc-predictor"]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--corpora", default="code,prose")
    ap.add_argument("--pretrain-steps", type=int, default=None)
    ap.add_argument("--train-steps", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--results", default=str(RESULTS))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)  # what the demo runs with, for the machine record
    machine = machine_record("cpu", argv, __file__)

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

    notes = ["Perplexity on held-out text, non-overlapping windows of seq_len tokens; `recall`: fraction of the "
             "oracle top-16-of-64 (by |h|) channels the routing keeps; `ffn density` as measured at the down_proj "
             "input."]
    tables = []
    for corpus, r in reports.items():
        c, sets = r["config"], list(r["rows"][0]["ppl_by_data"])
        about = (f"Dense model: d={c['hidden_size']}, {c['num_layers']} layers, d_ff={c['intermediate_size']}, "
                 f"pretrained {r['pretrain']['tokens']:,} tokens (loss {r['pretrain']['loss_last']:.3f}); continual "
                 f"training {c['train_steps']} steps, distillation weight {c['distill_weight']}; eval seq_len "
                 f"{c['seq_len']}, {c['eval_windows']} windows per set; total {r['seconds']:.0f} s.")
        columns = [("method", "method")] + [(f"ppl {k}", lambda row, k=k: f"{row['ppl_by_data'][k]:.3f}") for k in sets]
        columns += [("ppl / dense", "ppl_vs_dense", ".3f"), ("FFN density", "ffn_density", ".3f"),
                    ("recall", lambda row: "-" if row.get("recall") is None else f"{row['recall']:.3f}"),
                    ("training tokens", "train_tokens", ",")]
        sample = f"Sample from the upcycled model: `{r['sample']['text'][:200]!r}`"
        tables.append(Table(r["rows"], columns, f"{corpus}: held-out {', '.join(sets)}",
                            [about, f"![{corpus}](quality-{corpus}.png)", sample]))
    write_result("quality", {"machine": machine, "reports": reports}, [], [],
                 "Quality: bank-sparse 16-of-64 recipes vs dense, same base model, same token budget", notes,
                 tables=tables, out=results)


if __name__ == "__main__":
    main()
