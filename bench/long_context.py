"""Long context: training memory vs sequence length (measured and planned), RULER scores per length, the
per-layer diagnosis and a single-layer repair. CPU; results in bench/results/long_context_*.

    python bench/long_context.py memory [--layers 4 --lengths 1024,2048,4096,8192,16384]
    python bench/long_context.py plan                      # the planner's figures for Qwen2.5-7B at 32K
    python bench/long_context.py tasks --model SPARSE --reference DENSE --tasks passkey,niah_single_1
    python bench/long_context.py diagnose --model SPARSE --reference DENSE --task passkey [--layers ...]
    python bench/long_context.py repair --model SPARSE --reference DENSE --diagnosis DIR --method keep --keep 32

`memory`: one `upcycle.train` step per (model, length) in its own process, batch 1, gradient checkpointing,
the default objective (CE + KL to the dense teacher, logits 2048 tokens at a time), fp32, 1 thread. The model
has SmolLM2-135M's geometry (d 576, d_ff 1536, 9 / 3 heads, vocabulary 49152) and --layers of its 30 layers,
random weights (memory and time do not depend on them); sparse = the default conversion (2-bit shadow with
a learned bias, 16 of 64). Peak = the step's peak RSS (VmHWM, reset after step 1; glibc told to return freed
blocks at once) minus the RSS before the model was built; time = the step's process CPU time (steadier than
wall time on shared cores). Next to each: the planner's estimate (`upcycle train --plan`).

`tasks` / `diagnose` / `repair` run the CLI (`upcycle eval --task`, `upcycle diagnose`, `upcycle repair`)
and keep their JSON; results quote the commands. Run them under `flock /work/heavy.lock` on a shared machine.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS, machine_record, write_result
from real_model import WORK

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
SMOLLM2 = WORK / "dense"  # bench/real_model.py's parent (its geometry and tokenizer, when built)
QWEN25_7B = {  # Qwen2.5-7B's config.json (the published one; only the shapes matter to the plan)
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944,
    "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
    "max_position_embeddings": 131072, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
    "hidden_act": "silu", "torch_dtype": "bfloat16", "use_sliding_window": False,
}


# ---------------------------------------------------------------------------------------------- memory
def _kb(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def measure_step(model: str, seq_len: int, data: str, out: str, threads: int, distill: float) -> dict:
    """One process: peak RSS and CPU time of training step 2 of `upcycle.train` (run in a child process)."""
    ctypes.CDLL("libc.so.6").mallopt(-3, 65536)  # M_MMAP_THRESHOLD: freed tensors leave RSS at once
    import torch

    torch.set_num_threads(threads)
    import upcycle.train.loop as loop
    from upcycle.train.config import TrainConfig

    base: dict = {}
    build = loop.build_student

    def wrapped(cfg):
        gc.collect()
        base["rss"] = _kb("VmRSS")
        return build(cfg)

    def anonymous(model):
        """Weights in anonymous memory: upcycle.load maps safetensors files, whose clean pages the kernel may drop
        from RSS under memory pressure (other processes), which would make RSS under-count them."""
        for p in list(model.parameters()) + list(model.buffers()):
            p.data = p.data.clone()
        return model

    teacher = loop.build_teacher

    def wrapped_teacher(cfg, device, dtype):
        model, where = teacher(cfg, device, dtype)
        return anonymous(model), where

    loop.build_student = lambda cfg: (lambda r: (anonymous(r[0]), r[1]))(wrapped(cfg))
    loop.build_teacher = wrapped_teacher
    res: dict = {}

    class Done(Exception):
        pass

    def on_step(step, record):
        if step == 1:
            gc.collect()
            res["before"] = _kb("VmRSS")
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
            res["t0"], res["w0"] = time.process_time(), time.perf_counter()
        elif step == 2:
            res["cpu_s"], res["wall_s"] = time.process_time() - res["t0"], time.perf_counter() - res["w0"]
            res["hwm"] = _kb("VmHWM")
            raise Done

    cfg = TrainConfig(model=model, data=[data], out=out, seq_len=seq_len, steps=3, batch_size=1,
                      gradient_checkpointing=True, eval_every=0, save_every=0, progress=False, tensorboard=False,
                      val_fraction=0.0, distill_weight=distill, num_threads=threads, device="cpu")
    try:
        loop.train(cfg, on_step=on_step)
    except Done:
        pass
    return {"peak_mb": (res["hwm"] - base["rss"]) / 1024, "persistent_mb": (res["before"] - base["rss"]) / 1024,
            "cpu_s": res["cpu_s"], "wall_s": res["wall_s"], "base_rss_mb": base["rss"] / 1024}


def planned(model: str, seq_len: int, distill: float) -> dict:
    from upcycle.train.config import TrainConfig
    from upcycle.train.plan import plan_config

    cfg = TrainConfig(model=model, data=["-"], out="-", seq_len=seq_len, batch_size=1, gradient_checkpointing=True,
                      distill_weight=distill, device="cpu")
    p = plan_config(cfg, 1, "cpu")
    return {"plan_mb": p.peak_bytes / 2**20, "plan_event": p.peak_event,
            "plan_breakdown_mb": {k: v / 2**20 for k, v in p.breakdown.items()}}


def build_models(work: Path, layers: int) -> dict[str, Path]:
    """SmolLM2-135M geometry with `layers` layers, random weights: dense and its default conversion."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    import upcycle
    from upcycle.data import load_tokenizer
    from upcycle.testing import stdlib_corpus, tiny_config, train_bpe_tokenizer

    if SMOLLM2.is_dir():
        config = AutoConfig.from_pretrained(SMOLLM2)
        config.num_hidden_layers = layers
        tok = load_tokenizer(SMOLLM2)
    else:  # the same geometry from scratch, an offline tokenizer
        tok = train_bpe_tokenizer(stdlib_corpus(max_bytes=300_000), vocab_size=4096)
        config = tiny_config("llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                             num_hidden_layers=layers, num_attention_heads=9, num_key_value_heads=3,
                             max_position_embeddings=8192, tie_word_embeddings=True)
    config.max_position_embeddings = max(config.max_position_embeddings, 32768)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    dense, sparse = work / "dense", work / "sparse"
    upcycle.save(model, dense, tokenizer=tok)
    upcycle.convert(model, upcycle.BankSparseConfig(), progress=False)
    upcycle.save(model, sparse, tokenizer=tok)
    return {"dense": dense, "sparse": sparse}


def data_file(work: Path) -> Path:
    src = SHARED / "wikitext-2-raw-test.txt"
    if src.exists():
        return src
    from upcycle.testing import stdlib_corpus

    f = work / "text.txt"
    f.write_text("\n\n".join(stdlib_corpus(max_bytes=1_500_000)))
    return f


def cmd_memory(args) -> int:
    lengths = [int(v) for v in args.lengths.split(",")]
    work = Path(tempfile.mkdtemp(prefix="long_context_memory."))
    models = build_models(work, args.layers)
    data = data_file(work)
    record = {"machine": machine_record("cpu", script=__file__), "config": {
        "layers": args.layers, "lengths": lengths, "threads": args.threads, "distill_weight": args.distill,
        "geometry": "SmolLM2-135M (d 576, d_ff 1536, 9/3 heads, head 64, vocab 49152)", "data": str(data)}}
    rows = []
    for n in lengths:
        for method in ("sparse", "dense"):
            cmd = [sys.executable, __file__, "_step", str(models[method]), str(n), str(data),
                   str(work / f"run-{method}-{n}"), str(args.threads), str(args.distill)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("STEP ")), None)
            if proc.returncode or line is None:
                print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
                return 1
            row = {"seq_len": n, "method": method, **json.loads(line[5:]),
                   **planned(str(models[method]), n, args.distill)}
            row["plan_error"] = row["plan_mb"] / row["peak_mb"] - 1
            row["peak_kb_per_token"] = row["peak_mb"] * 1024 / n
            row["step_kb_per_token"] = (row["peak_mb"] - row["persistent_mb"]) * 1024 / n
            rows.append(row)
            print(f"{n:>6} {method:>6}: peak {row['peak_mb']:8.1f} MB (plan {row['plan_mb']:8.1f}, "
                  f"{row['plan_error']:+.1%}), step {row['cpu_s']:.1f} s CPU", flush=True)
    for method in ("sparse", "dense"):  # marginal activation bytes per token between consecutive lengths
        mine = [r for r in rows if r["method"] == method]
        for a, b in zip(mine[:-1], mine[1:], strict=True):
            b["marginal_kb_per_token"] = (b["peak_mb"] - a["peak_mb"]) * 1024 / (b["seq_len"] - a["seq_len"])
    by = {(r["seq_len"], r["method"]): r for r in rows}
    notes = [
        f"One `upcycle.train` step (step 2; CE + KL to the dense teacher, logits 2048 tokens at a time, gradient "
        f"checkpointing, batch 1, fp32, {args.threads} thread) of a model with SmolLM2-135M's geometry and "
        f"{args.layers} of its 30 layers (random weights); sparse = the default conversion. peak MB = the step's peak "
        "RSS minus the RSS before the model was built (weights, AdamW moments, teacher, activations, logits); plan MB "
        "= `upcycle train --plan` for the same run; kB/token = peak / length; marginal = extra peak per extra token "
        "from the previous length (flat = no quadratic term); CPU s = the step's process CPU time.",
    ]
    if (2048, "sparse") in by and (16384, "sparse") in by:
        for m in ("sparse", "dense"):
            a, b = by[2048, m], by[16384, m]
            notes.append(f"{m}: peak per token at 16K / at 2K = {b['peak_kb_per_token'] / a['peak_kb_per_token']:.2f}; "
                         f"marginal per token 8K-16K / 2K-4K = "
                         f"{b.get('marginal_kb_per_token', 0) / by[4096, m].get('marginal_kb_per_token', 1):.2f}.")
    worst = max(abs(r["plan_error"]) for r in rows)
    notes.append(f"Planner error: at most {worst:.1%} over every row.")
    columns = [("seq_len", "seq_len"), ("method", "method"), ("peak MB", "peak_mb", ".0f"),
               ("plan MB", "plan_mb", ".0f"),
               ("plan err", lambda r: f"{r['plan_error']:+.1%}"), ("kB/token", "peak_kb_per_token", ".1f"),
               ("marginal kB/token", "marginal_kb_per_token", ".1f"), ("CPU s", "cpu_s", ".1f"),
               ("wall s", "wall_s", ".1f")]
    write_result("long_context_memory", record, rows, columns, "Training memory and step time vs sequence length "
                 "(CPU)", notes, csv_rows=True)
    plot_memory(rows, RESULTS / "long_context_memory.png", args.layers)
    return 0


def plot_memory(rows: list[dict], path: Path, layers: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for method, color in (("sparse", "C0"), ("dense", "C1")):
        mine = [r for r in rows if r["method"] == method]
        x = [r["seq_len"] for r in mine]
        a.plot(x, [r["peak_mb"] / 1024 for r in mine], "o-", color=color, label=f"{method}: measured")
        a.plot(x, [r["plan_mb"] / 1024 for r in mine], "x--", color=color, label=f"{method}: planned")
        b.plot(x, [r["cpu_s"] for r in mine], "o-", color=color, label=method)
    for ax in (a, b):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length (tokens)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    a.set_ylabel("peak memory of a training step (GiB)")
    b.set_ylabel("step CPU time (s, 1 thread)")
    a.set_title("peak memory: measured vs upcycle train --plan", fontsize=9)
    b.set_title("step time", fontsize=9)
    fig.suptitle(f"SmolLM2-135M geometry, {layers} layer{'s' if layers != 1 else ''}, gradient checkpointing, "
                 "KD teacher, fp32 CPU", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- plan
def cmd_plan(args) -> int:
    from upcycle.train.config import TrainConfig
    from upcycle.train.plan import GiB, plan_config

    work = Path(tempfile.mkdtemp(prefix="long_context_plan."))
    (work / "qwen2.5-7b").mkdir()
    (work / "qwen2.5-7b" / "config.json").write_text(json.dumps(QWEN25_7B))
    rows = []
    cases = [("1 x H200 (141 GB)", 1, 141, {}), ("8 x 80 GB, FSDP2", 8, 80, {}),
             ("1 x H200, --train-only ffn", 1, 141, {"train_only": "ffn"}),
             ("1 x H200, --train-only ffn --distill-weight 0", 1, 141, {"train_only": "ffn", "distill_weight": 0.0})]
    for sparse in (True, False):
        for label, world, gb, extra in cases:
            for ckpt in (True, False) if not extra else (True,):
                recipe = {"name": "bank_sparse", "bank_size": 64, "keep": 16} if sparse else {}
                cfg = TrainConfig(model=str(work / "qwen2.5-7b"), data=["-"], out="-", seq_len=args.seq_len,
                                  batch_size=1, gradient_checkpointing=ckpt, device="cuda", recipe=recipe, **extra)
                p = plan_config(cfg, world, "cuda", gb)
                longest = p.longest_fitting
                rows.append({"method": "sparse" if sparse else "dense", "devices": label, "checkpointing": ckpt,
                             "peak_gib": p.peak_bytes / GiB, "fits": p.fits, "at": p.peak_event,
                             **{f"{k}_gib": v / GiB for k, v in p.breakdown.items()},
                             "max_seq_len": longest, "plan": p.to_dict()})
                print(f"{rows[-1]['method']:>6} {label:<18} ckpt={ckpt!s:<5} peak {rows[-1]['peak_gib']:7.1f} GiB "
                      f"fits={p.fits} longest={longest}", flush=True)
    record = {"machine": machine_record("cpu", script=__file__), "config": {"seq_len": args.seq_len, "batch": 1,
              "model": "Qwen2.5-7B (config.json shapes)", "precision": "bf16 autocast, fp32 master weights + AdamW",
              "teacher": "bf16, not sharded", "sparse": "bank_sparse 16/64, default predictor for this shape"}}
    cols = [("method", "method"), ("devices", "devices"), ("ckpt", lambda r: "on" if r["checkpointing"] else "off"),
            ("weights", "weights_gib", ".1f"), ("grads", "gradients_gib", ".1f"), ("optim", "optimizer_gib", ".1f"),
            ("activations", "activations_gib", ".1f"), ("logits", "logits_gib", ".1f"),
            ("teacher", "teacher_gib", ".1f"),
            ("peak GiB", "peak_gib", ".1f"), ("fits", lambda r: "yes" if r["fits"] else "NO"),
            ("longest fitting seq", lambda r: r["max_seq_len"] or "none")]
    notes = [f"`upcycle train --model Qwen2.5-7B --seq-len {args.seq_len} --batch-size 1 [--gradient-checkpointing] "
             "--plan [--plan-world-size 8] --plan-device cuda --plan-memory-gb GB` (the planner's arithmetic, not a "
             "measurement: no GPU here). Per device, GiB; fits = peak <= 90% of the device memory (allocator, CUDA "
             "context and NCCL take the rest). Longest fitting seq: the largest multiple of 1024 that fits."]
    write_result("long_context_plan", record, rows, cols, f"Planner: Qwen2.5-7B at {args.seq_len} tokens", notes)
    return 0


# ---------------------------------------------------------------------------------------------- tasks, diagnosis
def run_cli(argv: list[str], log_path: Path) -> dict | None:
    """Run `upcycle ARGV` (stderr to log_path), return its --json output."""
    cmd = [sys.executable, "-m", "upcycle", *argv]
    print("$ upcycle " + shlex.join(argv), flush=True)
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
    if proc.returncode:
        print(Path(log_path).read_text()[-3000:], file=sys.stderr)
        return None
    return json.loads(proc.stdout)


def cmd_tasks(args) -> int:
    out = Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    previous = json.loads((RESULTS / f"{args.name}.json").read_text()) if args.append else {}
    rows, results, commands = list(previous.get("rows", [])), {}, list(previous.get("commands", []))
    for label, path in (("dense", args.reference), ("sparse", args.model), *[(f"repaired ({p})", p) for p in
                                                                             args.extra]):
        argv = ["eval", "--model", path, "--task", args.tasks, "--lengths", args.lengths, "--samples",
                str(args.samples), "--seed", str(args.seed), "--device", "cpu", "--json"]
        if args.haystack:
            argv += ["--haystack", args.haystack]
        r = run_cli(argv, out / f"eval-{len(results)}.log")
        if r is None:
            return 1
        results[label] = r
        commands.append("upcycle " + shlex.join(argv))
        for task, by_len in r["tasks"].items():
            for n, t in by_len.items():
                rows = [x for x in rows if (x["method"], x["task"], x["seq_len"]) != (label, task, int(n))]
                rows.append({"method": label, "task": task, "seq_len": int(n), "score": t["score"],
                             "ruler": t["ruler_score"], "n": t["n"], "ffn_density": t.get("ffn_density"),
                             "prompt_tokens": t["prompt_tokens"]})
    order = {"dense": 0, "sparse": 1}
    rows.sort(key=lambda r: (r["task"], r["seq_len"], order.get(r["method"], 2), r["method"]))
    record = {"machine": machine_record("cpu", script=__file__), "commands": commands,
              "raw": {**previous.get("raw", {}), **{f"{k} {args.tasks} {args.lengths}": v for k, v in results.items()}}}
    cols = [("task", "task"), ("seq_len", "seq_len"), ("method", "method"), ("score", "score", ".3f"),
            ("RULER %", "ruler", ".2f"), ("n", "n"), ("FFN density", "ffn_density", ".4f"),
            ("prompt tokens", "prompt_tokens", ".0f")]
    write_result(args.name, record, rows, cols, "RULER scores per length: dense, sparse" + (
        ", repaired" if any(r["method"].startswith("repaired") for r in rows) else ""), _task_notes(rows, commands))
    return 0


def _task_notes(rows: list[dict], commands: list[str]) -> list[str]:
    """What the table says, computed from its rows: which tasks the dense model can do at its shortest length
    (score >= 0.5: the issue's qualifying rule) and the largest sparse-vs-dense gap."""
    dense = {(r["task"], r["seq_len"]): r["score"] for r in rows if r["method"] == "dense"}
    sparse = {(r["task"], r["seq_len"]): r["score"] for r in rows if r["method"] == "sparse"}
    shortest = {t: min(n for tt, n in dense if tt == t) for t, _ in dense}
    qualify = sorted(t for t, n in shortest.items() if dense[t, n] >= 0.5)
    rest = sorted(set(shortest) - set(qualify))
    gaps = sorted(((dense[k] - sparse[k], k) for k in dense if k in sparse), reverse=True)
    notes = ["SmolLM2-135M, greedy decoding from prompt + answer prefix, seed 42, RULER string_match_all in [0, 1] "
             "(score) and percent (RULER %); n samples per (task, length).",
             f"Qualifying tasks (dense >= 0.5 at its shortest length here): {', '.join(qualify) or 'none'}"
             + (f"; below it: {', '.join(f'{t} {dense[t, shortest[t]]:.2f}' for t in rest)}" if rest else "") + "."]
    if gaps:
        g, (task, n) = gaps[0]
        notes.append(f"Largest sparse-vs-dense gap: {task} at {n} tokens, {dense[task, n]:.2f} -> {sparse[task, n]:.2f}"
                     if g > 0 else "The sparse model scores at least the dense reference on every (task, length).")
    notes.append("Commands: " + "; ".join(f"`{c}`" for c in commands))
    return notes


def cmd_diagnose(args) -> int:
    out = Path(args.out)
    argv = ["diagnose", "--model", args.model, "--task", args.task, "--lengths", args.lengths, "--samples",
            str(args.samples), "--seed", str(args.seed), "--out", str(out), "--overwrite", "--device", "cpu", "--json",
            "--sweep", args.sweep]
    if args.reference:
        argv += ["--reference", args.reference]
    if args.layers:
        argv += ["--layers", args.layers]
    if args.haystack:
        argv += ["--haystack", args.haystack]
    out.mkdir(parents=True, exist_ok=True)
    r = run_cli(argv, out / "diagnose.log")
    if r is None:
        return 1
    import shutil

    shutil.copy(out / "heatmap.png", RESULTS / f"{args.name}_heatmap.png")
    shutil.copy(out / "diagnosis.json", RESULTS / f"{args.name}.json")
    from upcycle.recipes.layer_repair.diagnose import format_table

    (RESULTS / f"{args.name}.md").write_text(
        f"# Per-layer diagnosis: {args.task}\n\n`upcycle {shlex.join(argv)}`\n\n```\n{format_table(r)}\n```\n\n"
        f"![heatmap]({args.name}_heatmap.png)\n")
    print(format_table(r))
    return 0


def cmd_repair(args) -> int:
    out = Path(args.out)
    argv = ["repair", "--model", args.model, "--layer", args.layer, "--method", args.method, "--out", str(out),
            "--overwrite", "--device", "cpu", "--json"]
    for flag, value in (("--keep", args.keep), ("--diagnosis", args.diagnosis), ("--reference", args.reference),
                        ("--steps", args.steps), ("--seq-len", args.seq_len), ("--refit-tokens", args.refit_tokens),
                        ("--lengths", args.lengths)):
        if value is not None:
            argv += [flag, str(value)]
    if args.data:
        argv += ["--data", *args.data]
    if args.haystack:
        argv += ["--haystack", args.haystack]
    out.parent.mkdir(parents=True, exist_ok=True)
    r = run_cli(argv, out.parent / f"{out.name}.repair.log")
    if r is None:
        return 1
    from upcycle.cli.repair import format_report

    name = args.name
    (RESULTS / f"{name}.json").write_text(json.dumps({"command": "upcycle " + shlex.join(argv), **r}, indent=1,
                                                     default=str) + "\n")
    (RESULTS / f"{name}.md").write_text(f"# Single-layer repair\n\n`upcycle {shlex.join(argv)}`\n\n```\n"
                                        f"{format_report(r)}\n```\n")
    print(format_report(r))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("memory")
    m.add_argument("--layers", type=int, default=4)
    m.add_argument("--lengths", default="1024,2048,4096,8192,16384")
    m.add_argument("--threads", type=int, default=1)
    m.add_argument("--distill", type=float, default=1.0)
    pl = sub.add_parser("plan")
    pl.add_argument("--seq-len", type=int, default=32768)
    t = sub.add_parser("tasks")
    t.add_argument("--model", required=True)
    t.add_argument("--reference", required=True)
    t.add_argument("--extra", nargs="*", default=[], help="more checkpoints (repaired models)")
    t.add_argument("--tasks", default="passkey,niah_single_1")
    t.add_argument("--lengths", default="1024,2048,4096,8192")
    t.add_argument("--samples", type=int, default=3)
    t.add_argument("--seed", type=int, default=42)
    t.add_argument("--work", default="/tmp/long_context_tasks")
    t.add_argument("--name", default="long_context_tasks")
    t.add_argument("--haystack", help="essay text for the essay-haystack tasks (upcycle eval --haystack)")
    t.add_argument("--append", action="store_true", help="merge into the existing result of --name (other tasks "
                   "or lengths; a re-measured (model, task, length) replaces its row)")
    d = sub.add_parser("diagnose")
    d.add_argument("--model", required=True)
    d.add_argument("--reference")
    d.add_argument("--task", default="passkey")
    d.add_argument("--lengths", default="1024,2048,4096,8192")
    d.add_argument("--samples", type=int, default=3)
    d.add_argument("--seed", type=int, default=42)
    d.add_argument("--sweep", default="3")
    d.add_argument("--layers")
    d.add_argument("--out", default="/tmp/long_context_diagnosis")
    d.add_argument("--name", default="long_context_diagnosis")
    d.add_argument("--haystack", help="essay text for the essay-haystack tasks")
    r = sub.add_parser("repair")
    r.add_argument("--model", required=True)
    r.add_argument("--reference")
    r.add_argument("--diagnosis")
    r.add_argument("--layer", default="auto")
    r.add_argument("--method", default="keep")
    r.add_argument("--keep", type=int)
    r.add_argument("--data", nargs="*")
    r.add_argument("--steps", type=int)
    r.add_argument("--seq-len", type=int)
    r.add_argument("--refit-tokens", type=int)
    r.add_argument("--lengths")
    r.add_argument("--out", default="/tmp/long_context_repaired")
    r.add_argument("--name", default="long_context_repair")
    r.add_argument("--haystack", help="essay text for the essay-haystack tasks")
    s = sub.add_parser("_step")
    s.add_argument("model")
    s.add_argument("seq_len", type=int)
    s.add_argument("data")
    s.add_argument("out")
    s.add_argument("threads", type=int)
    s.add_argument("distill", type=float)
    args = p.parse_args(argv)
    if args.cmd == "_step":
        print("STEP " + json.dumps(measure_step(args.model, args.seq_len, args.data, args.out, args.threads,
                                                args.distill)), flush=True)
        return 0
    return {"memory": cmd_memory, "plan": cmd_plan, "tasks": cmd_tasks, "diagnose": cmd_diagnose,
            "repair": cmd_repair}[args.cmd](args)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
