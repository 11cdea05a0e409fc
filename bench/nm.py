"""N:M (2:4) weight sparsity on a real checkpoint: SmolLM2-135M (Llama, 30 layers, d 576, d_ff 1536).

The dense fp32 parent is a local checkpoint directory (default /work/cache/smollm2-135m-dense). Text: ../shared/data
WikiText-2 test + TinyStories validation; each file's last 15% is held out for perplexity (512-token windows,
stride 512, the first --eval-windows of each), the first 85% is the training / calibration text (the split of
bench/real_model.py).

Stages; each adds rows to bench/results/nm.json and redraws nm.md (`report` also draws nm.png):

    python bench/nm.py oneshot                                   # dense, magnitude, Wanda, SparseGPT (+ attention)
    python bench/nm.py train --name dense-continued --method dense   # the matched-token control
    python bench/nm.py train --name srste --method srste
    python bench/nm.py train --name cast --method cast
    python bench/nm.py train --name stacked --stack-on cast --steps 50   # bank-sparse on the CAST model
    python bench/nm.py train --name bank-sparse --method bank_sparse --steps 50  # the single recipe, same steps
    python bench/nm.py report
    python bench/nm.py routing   # + the N:M rows trained under the bake-off's protocol (bench/routing.py runs)

`oneshot` runs `upcycle convert --recipe nm --method M --data TRAIN` (what a user runs). `train` converts the same
way (`--method cast|srste`: the checkpoint stays dense, `upcycle train` hard-prunes at its end), then trains with
one objective for every row: CE + 0.5 KL(dense parent || student) at temperature 1 (CAST's 1/3 KL + 2/3 CE up to
a factor Adam removes), --steps x 512 tokens, the same LR schedule. Each trained row's curve is the held-out ppl
of the model as the final save would make it at that step (CAST: scales folded and hard-pruned; SR-STE: its
sparse forward; dense: as is).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS, Table, machine_record, write_result
from real_model import split_texts  # the one train / held-out cut every real-model bench shares

from upcycle.eval.perplexity import HeldOut

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
FILES = {"wikitext2": "wikitext-2-raw-test.txt", "tinystories": "tinystories-val.txt"}
CORPUS_NAMES = {"wikitext2": "WikiText-2", "tinystories": "TinyStories"}
HELD_OUT = 0.15
DENSE = "/work/cache/smollm2-135m-dense"
TOKENS_PER_STEP = 512  # seq_len 256 x batch 2
NAME = "nm"


def exact_of(model) -> dict:
    """The N:M exactness of a model (its own section, or the one stacked under another recipe)."""
    from upcycle.recipes.nm.config import NMSparseConfig
    from upcycle.recipes.nm.convert import exactness
    from upcycle.recipes.nm.training import nm_section

    section, _ = nm_section(model)
    if section is None:
        return {"exact": None}
    ex = exactness(model, NMSparseConfig.from_dict(section))
    return {k: ex[k] for k in ("exact", "linears", "exact_linears", "weight_density", "max_nonzeros_per_group")}


def setup(args):
    from upcycle.io import load_pretrained

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    train_dir, held = split_texts(work)
    _, tok = load_pretrained(args.dense)
    return work, train_dir, tok, HeldOut(tok, held, args.eval_windows)


def cli(argv: list[str]) -> None:
    from upcycle.cli import main

    print("$ upcycle " + shlex.join(argv), flush=True)
    rc = main(argv)
    if rc:
        sys.exit(f"upcycle {argv[0]} failed ({rc})")


def convert_nm(args, train_dir: Path, out: Path, method: str, targets: str) -> float:
    t0 = time.perf_counter()
    argv = ["convert", "--model", args.dense, "--out", str(out), "--recipe", "nm", "--method", method,
            "--targets", targets, "--calib-sequences", str(args.calib_sequences), "--calib-seq-len", "512"]
    if method in ("wanda", "sparsegpt"):
        argv += ["--data", str(train_dir)]
    cli(argv)
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------- one-shot
def oneshot(args) -> None:
    import upcycle

    work, train_dir, tok, evaluator = setup(args)
    variants = [("dense", None, None)] + [(f"{m}", m, "ffn") for m in ("magnitude", "wanda", "sparsegpt")]
    variants += [(f"{m} +attn", m, "ffn,attention") for m in ("magnitude", "sparsegpt")]
    if args.only:
        variants = [v for v in variants if v[0] in args.only.split(",")]
    for name, method, targets in variants:
        t0 = time.perf_counter()
        if method is None:
            model = upcycle.load(args.dense)
        else:
            out = Path(tempfile.mkdtemp(prefix=f"oneshot-{method}-", dir=work))
            convert_nm(args, train_dir, out / "model", method, targets)
            model = upcycle.load(out / "model")
        prep = time.perf_counter() - t0
        row = {"method": name, "kind": "dense" if method is None else "one-shot", "targets": targets or "-",
               "ppl": evaluator(model), **exact_of(model), "train_tokens": 0, "wall_s": prep,
               "calibration": None if method in (None, "magnitude") else f"{args.calib_sequences} x 512 tokens"}
        print(json.dumps(row), flush=True)
        add_rows(args, [row])


# ---------------------------------------------------------------------------------------------- train
def train_run(args) -> None:
    import upcycle
    from upcycle.recipes.nm.training import pruned_copy
    from upcycle.train import train
    from upcycle.train.config import TrainConfig

    work, train_dir, tok, evaluator = setup(args)
    run_dir = Path(tempfile.mkdtemp(prefix=f"{args.name}-", dir=work))
    t0 = time.perf_counter()
    recipe_flags: dict = {}
    teacher = None
    if args.stack_on:  # bank-sparse on a trained N:M model: `upcycle convert` (default recipe) on its checkpoint
        base = Path(json.loads((Path(args.out) / "nm.json").read_text())["models"][args.stack_on])
        model_dir = run_dir / "converted"
        cli(["convert", "--model", str(base), "--out", str(model_dir)] + shlex.split(args.convert))
        teacher = args.dense  # the same teacher as every other row: the dense parent
    elif args.method == "dense":
        model_dir = Path(args.dense)
    elif args.method == "bank_sparse":
        model_dir = run_dir / "converted"
        cli(["convert", "--model", args.dense, "--out", str(model_dir)] + shlex.split(args.convert))
        teacher = args.dense
    else:
        model_dir = run_dir / "converted"
        convert_nm(args, train_dir, model_dir, args.method, args.targets)
        recipe_flags = {"cast_ramp_steps": args.ramp_steps or max(1, args.steps // 2), "cast_decay": args.cast_decay,
                        "mask_refresh_every": 10, "scale_lr_mult": args.scale_lr_mult}
        if args.method == "srste":
            recipe_flags = {"srste_lambda": args.srste_lambda}
    convert_s = time.perf_counter() - t0
    cfg = TrainConfig.from_dict(dict(
        model=str(model_dir), data=[str(train_dir)], out=str(run_dir / "train"), steps=args.steps, seq_len=256,
        batch_size=2, lr=args.lr, min_lr_ratio=args.min_lr_ratio, lr_warmup_steps=max(1, args.steps // 20),
        distill_weight=0.5, distill_temperature=1.0, eval_every=args.eval_every, save_every=0, progress=True,
        tensorboard=False, num_threads=args.threads, teacher=teacher, **recipe_flags))
    curve: list[dict] = []
    timing = {"eval_s": 0.0}
    t_train = time.perf_counter()

    def final_form(model):  # CAST: scales folded + hard prune; SR-STE: its sparse forward is the hard prune
        return pruned_copy(model) if args.method in ("cast", "srste") and not args.stack_on else model

    def on_eval(step, model):
        t = time.perf_counter()
        ppl = evaluator(final_form(model))
        timing["eval_s"] += time.perf_counter() - t
        curve.append({"step": step, "tokens": step * TOKENS_PER_STEP, "ppl": ppl,
                      "wall_s": convert_s + time.perf_counter() - t_train - timing["eval_s"]})
        print(f"step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in ppl.items()), flush=True)
        return {f"ppl_{k}": v for k, v in ppl.items()}

    t_start = time.perf_counter()
    on_eval(0, upcycle.load(model_dir))  # step 0: the converted model (CAST/SR-STE: as if hard-pruned now)
    t_train += time.perf_counter() - t_start
    result = train(cfg, on_eval=on_eval)
    total_s = time.perf_counter() - t0 - timing["eval_s"]
    model = upcycle.load(result.model_dir)
    metrics = [json.loads(x) for x in (run_dir / "train" / "metrics.jsonl").read_text().splitlines()]
    pruned_mass = [{"step": r["step"], "nm_pruned_mass": r["nm_pruned_mass"]} for r in metrics if "nm_pruned_mass" in r]
    kind = "stacked" if args.stack_on else "dense" if args.method == "dense" else "trained"
    row = {"method": args.name, "kind": kind, "targets": args.targets if args.method in ("cast", "srste") else "-",
           "ppl": evaluator(model), **exact_of(model), "train_tokens": result.step * TOKENS_PER_STEP,
           "wall_s": total_s, "convert_s": convert_s, "curve": curve, "pruned_mass": pruned_mass,
           "lr": args.lr, "recipe_flags": recipe_flags, "stack_on": args.stack_on or None,
           "final_model": str(result.model_dir)}
    print(json.dumps({k: v for k, v in row.items() if k not in ("curve", "pruned_mass")}), flush=True)
    add_rows(args, [row], model={args.name: str(result.model_dir)})


# ---------------------------------------------------------------------------------------------- results
def _command() -> str:
    return machine_record("cpu", script=__file__)["command"]


def add_rows(args, rows: list[dict], model: dict | None = None) -> None:
    path = Path(args.out) / f"{NAME}.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    by_method = {r["method"]: r for r in old.get("rows", [])}
    by_method.update({r["method"]: {**r, "command": _command()} for r in rows})
    models = {**old.get("models", {}), **(model or {})}
    write_report(args, list(by_method.values()), models, old.get("routing_rows"))


def routing_rows(args) -> None:
    """The N:M rows of bench/routing.py (the bake-off's protocol: 200 steps x 512 tokens, KL weight 1, LR 1e-4 unless
    the row's flags say otherwise, bf16 autocast) with each saved model's exactness checked here."""
    import upcycle

    routing = json.loads((RESULTS / "routing.json").read_text())
    data = json.loads((Path(args.out) / f"{NAME}.json").read_text())
    # a row whose saved model is gone (another machine) keeps the exactness measured on it before
    measured = {r["method"]: r for r in data.get("routing_rows") or []}
    rows = []
    for r in routing["rows"]:
        # N:M rows, and rows stacked on one (bank-sparse routing on a 2:4 model: its zeros must survive training)
        if r.get("recipe") != "nm" and r["method"] != "dense-continued" and "(on nm-" not in r.get("convert_flags", ""):
            continue
        row = {"method": r["method"], "ppl_in": r["ppl_in"], "ppl_out": r["ppl_out"],
               "control": r.get("control", "dense-continued"), "train_tokens": r["train_tokens"],
               "step_s": r.get("step_s_median"), "curve": r["curve"], "command": r["command"]}
        if Path(r["model_dir"]).exists():
            model = upcycle.load(r["model_dir"])
            row.update(exact_of(model) if r["method"] != "dense-continued" else {"exact": None})
            del model
        elif r["method"] in measured:
            row.update({k: v for k, v in measured[r["method"]].items() if k not in row})
        else:
            print(f"{r['method']}: left out (its saved model {r['model_dir']} is gone, no exactness recorded)")
            continue
        rows.append(row)
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "curve"}), flush=True)
    write_report(args, data["rows"], data.get("models", {}), rows)


def _gmean(ppl: dict, ref: dict) -> float:
    return math.exp(sum(math.log(ppl[k] / ref[k]) for k in ref) / len(ref))


ORDER = ["dense", "dense-continued", "magnitude", "wanda", "sparsegpt", "magnitude +attn", "sparsegpt +attn",
         "srste", "cast", "cast +attn", "bank-sparse", "stacked"]


def _routing_table(rows: list[dict]) -> Table:
    by = {r["method"]: r for r in rows}

    def x(key):
        return lambda r: f"{r[key] / by[r['control']][key]:.3f}" if r["control"] in by else ""

    cols = [("method", "method"), ("in-domain ppl", "ppl_in", ".2f"), ("x control", x("ppl_in")),
            ("out-of-domain ppl", "ppl_out", ".2f"), ("x control ", x("ppl_out")),
            ("exact 2:4", lambda r: {True: "yes", False: "NO", None: "-"}[r.get("exact")]),
            ("weight density", lambda r: f"{r['weight_density']:.3f}" if r.get("weight_density") else ""),
            ("train tokens", "train_tokens"), ("s/step", "step_s", ".2f"),
            ("in / out-of-domain ppl by training tokens", lambda r: "; ".join(
                f"{p['tokens'] // 1000}K: {p['ppl_in']:.1f} / {p['ppl_out']:.2f}" for p in r["curve"])),
            ("command", lambda r: f"`{r['command']}`")]
    notes = ["bench/routing.py runs (the bake-off's protocol, bench/results/bakeoff.md): `upcycle convert` with the "
             "row's flags, `upcycle train` 200 steps x 512 tokens on the first 85% of WikiText-2 test, CE + KL to the "
             "dense parent (weight 1), LR 1e-4 unless the command says otherwise, bf16 autocast, 2 threads; in-domain "
             "= WikiText-2's last 15%, out-of-domain = TinyStories' last 15% (never trained on). `x control` = ppl / "
             "the dense parent continued on the same tokens with the same objective. Exactness checked here on the "
             "saved checkpoint (rows stacked on an N:M model included: bank-sparse routing trained on the 2:4 model). "
             "Curve points before the last are the model as it trains, before the final hard prune "
             "(step 0: the converted checkpoint, still dense for CAST and SR-STE); the last is the saved, pruned "
             "model."]
    return Table(rows, cols, "Trained at the bake-off's protocol (equal tokens, same distillation)", notes,
                 key="routing_rows")


def write_report(args, rows: list[dict], models: dict, routing: list[dict] | None = None) -> list[dict]:
    rows = sorted(rows, key=lambda r: (ORDER.index(r["method"]) if r["method"] in ORDER else len(ORDER), r["method"]))
    by = {r["method"]: r for r in rows}
    dense = by.get("dense", {}).get("ppl")
    control = by.get("dense-continued", {}).get("ppl")
    corpora = list(FILES)

    def ratio(ref, c):
        return lambda r: f"{r['ppl'][c] / ref[c]:.3f}" if ref else ""

    columns = [("method", "method"), ("kind", "kind"), ("2:4 on", "targets")]
    for c in corpora:
        columns += [(f"{CORPUS_NAMES[c]} ppl", lambda r, c=c: f"{r['ppl'][c]:.2f}"),
                    ("x control", ratio(control, c)), ("x dense", ratio(dense, c))]
    columns += [("exact 2:4", lambda r: {True: "yes", False: "NO", None: "-"}[r.get("exact")]),
                ("weight density", lambda r: f"{r['weight_density']:.3f}" if r.get("weight_density") else ""),
                ("train tokens", "train_tokens"), ("wall", lambda r: f"{r['wall_s'] / 60:.1f} min")]
    curves = [r for r in rows if r.get("curve")]
    curve_cols = [("method", "method"), ("held-out ppl WikiText-2 / TinyStories by training tokens (0: converted)",
                   lambda r: "; ".join(f"{p['tokens'] // 1000}K: {p['ppl']['wikitext2']:.1f} / "
                                       f"{p['ppl']['tinystories']:.2f}" for p in r["curve"]))]
    commands = [("method", "method"), ("command", lambda r: f"`{r['command']}`")]
    lr = next((r["lr"] for r in rows if r.get("lr")), None)
    notes = [f"SmolLM2-135M ({args.dense}, fp32). Held-out: the last 15% of WikiText-2 test and of TinyStories "
             f"validation, first {args.eval_windows} x 512-token windows each; training and calibration text: the "
             "first 85%. `x control` = ppl / the dense model continued on the same tokens with the same objective; "
             "`exact 2:4` = every targeted weight has at most 2 nonzeros in every 4 consecutive inputs (checked on the "
             "saved checkpoint as reloaded); wall = convert + train (evaluation excluded) on this machine's 2 shared "
             "cores.",
             "Objective of every trained row: CE + 0.5 KL(dense parent || student), temperature 1 (CAST's 1/3 KL + "
             f"2/3 CE up to a factor Adam removes), seq 256 x batch 2 = 512 tokens per step, peak LR {lr}, warm-up 5% "
             f"then min_lr_ratio {args.min_lr_ratio}. CAST: AdamS lambda {args.cast_decay}, ramp a_t = t/(steps/2), "
             f"mask refresh every 10 steps, weight scaling (scale LR x {args.scale_lr_mult}), hard prune at the end. "
             f"SR-STE: lambda {args.srste_lambda}. Calibration (Wanda, SparseGPT): {args.calib_sequences} x 512 "
             "tokens of the training text.",
             "`stacked`: the final `cast` model converted with the bank-sparse recipe (its defaults: 2-bit shadow, 16 "
             "of 64 channels per bank) and trained further (its train tokens are on top of the cast row's); the N:M "
             "zeros are kept by the N:M recipe's hooks composed with bank-sparse's. `bank-sparse`: the same conversion "
             "and steps on the dense parent (the single recipe)."]
    record = {"machine": machine_record("cpu", script=__file__), "models": models}
    tables = [Table(curves, curve_cols, "Held-out ppl during training"), Table(rows, commands, "Commands")]
    if routing:
        tables.append(_routing_table(routing))
    write_result(NAME, record, rows, columns, "N:M (2:4) weight sparsity on SmolLM2-135M", notes,
                 tables=tables, out=args.out)
    return rows


def report(args) -> None:
    data = json.loads((Path(args.out) / f"{NAME}.json").read_text())
    rows = write_report(args, data["rows"], data.get("models", {}), data.get("routing_rows"))
    plot(rows, Path(args.out))


def plot(rows: list[dict], out: Path) -> None:
    """nm.png: held-out ppl vs training tokens for the trained rows, one-shot rows as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {r["method"]: r for r in rows}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    for ax, c in zip(axes, FILES, strict=True):
        for r in rows:
            if r.get("curve") and r["kind"] != "stacked":
                xs = [p["tokens"] / 1000 for p in r["curve"]]
                style = dict(lw=2.5, marker="o") if r["method"] == "cast" else dict(lw=1.2, marker=".")
                ax.plot(xs, [p["ppl"][c] for p in r["curve"]], label=r["method"], **style)
        for name, ls in (("dense", "-"), ("sparsegpt", "--"), ("wanda", ":")):
            if name in by:
                ax.axhline(by[name]["ppl"][c], ls=ls, c="gray", lw=1, label=f"{name} (one-shot)" if name != "dense"
                           else "dense parent")
        ax.set(xlabel="training tokens (thousands)", ylabel=f"held-out {CORPUS_NAMES[c]} perplexity", yscale="log",
               title=f"2:4 FFN weights on SmolLM2-135M: {CORPUS_NAMES[c]}")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle("CAST vs SR-STE vs the dense control (CAST / SR-STE points: the model as its final hard prune "
                 "would leave it)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / f"{NAME}.png", dpi=120)
    print(f"wrote {out / NAME}.png")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=["oneshot", "train", "report", "routing"])
    ap.add_argument("--dense", default=DENSE, help="the dense fp32 parent checkpoint directory")
    ap.add_argument("--work", default=os.path.expanduser("~/.cache/upcycle/nm_bench"))
    ap.add_argument("--eval-windows", type=int, default=8, help="512-token held-out windows per corpus")
    ap.add_argument("--calib-sequences", type=int, default=64, help="Wanda/SparseGPT calibration windows of 512")
    ap.add_argument("--only", default="", help="oneshot: comma-separated rows to (re)measure")
    ap.add_argument("--name", default="cast")
    ap.add_argument("--method", default="cast", choices=["dense", "cast", "srste", "bank_sparse"])
    ap.add_argument("--targets", default="ffn")
    ap.add_argument("--stack-on", default="", help="train: convert this earlier row's final model with bank-sparse")
    ap.add_argument("--convert", default="", help="extra `upcycle convert` flags (bank-sparse rows)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--min-lr-ratio", type=float, default=1.0)
    ap.add_argument("--cast-decay", type=float, default=1e-4)
    ap.add_argument("--ramp-steps", type=int, default=0, help="CAST ramp (0: steps / 2)")
    ap.add_argument("--scale-lr-mult", type=float, default=1.0)
    ap.add_argument("--srste-lambda", type=float, default=2e-4)
    ap.add_argument("--eval-every", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(RESULTS), help="results folder")
    args = ap.parse_args(argv)
    {"oneshot": oneshot, "train": train_run, "report": report, "routing": routing_rows}[args.stage](args)


if __name__ == "__main__":
    main()
