"""Training-step throughput and peak memory, bank-sparse vs dense: same model, same process, several lengths.

    python bench/train_step.py                       # CPU default: ~4-5 min on 2 shared cores
    python bench/train_step.py --seq-lens 4096 8192 --layers 4 --grad-ckpt   # e.g. on a GPU

One step = forward + backward + AdamW of the `upcycle.train` objective (chunked LM loss, no teacher),
batch 1. The dense model is the sparse model's own parent (same weights, `upcycle.to_dense` of a copy).
Time: the two methods alternate step by step (order flipped every round) and the median is reported.
On CPU it is the process's CPU time at --threads 1, which time-slicing with other processes on shared
cores does not inflate (wall times are in the JSON too); on CUDA, synchronized wall time.
Memory, per method: peak during the step minus what was resident before it (activations, gradients,
temporaries: `step_mb`), plus that method's persistent state (weights + AdamW moments: `peak_mb`,
what a GPU's max_memory_allocated would show for that model alone), measured before the timed steps.
On CPU (Linux, glibc) the peak is the process's VmHWM (reset through /proc/self/clear_refs) after
glibc is told to return freed blocks at once (mallopt M_MMAP_THRESHOLD), so RSS follows live tensors;
on CUDA it is torch.cuda.max_memory_allocated. Results: bench/results/train_step_{cpu,cuda}.{json,csv,md}.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import RESULTS, Table, abba, machine_record, write_result


def _status_kb(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


class CpuMemory:
    """Peak RSS of a step. glibc first mmaps every block >= 64 KiB (set before any tensor exists, so no
    freed heap block is reused unseen): freed tensors leave RSS at once and RSS follows live tensors.
    `done()` then restores a training process's usual allocator (32 MiB threshold, glibc's dynamic maximum)
    for the timed steps, where page faults on every allocation would distort the times."""

    def __init__(self):
        import ctypes

        self.libc = ctypes.CDLL("libc.so.6")
        self.libc.mallopt(-3, 65536)  # M_MMAP_THRESHOLD

    def done(self) -> None:
        self.libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
        self.libc.mallopt(-1, 64 << 20)  # M_TRIM_THRESHOLD

    def start(self) -> None:
        gc.collect()
        self.base = _status_kb("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS

    def peak_bytes(self) -> int:
        return (_status_kb("VmHWM") - self.base) * 1024


class CudaMemory:
    def done(self) -> None:
        pass

    def start(self) -> None:
        import torch

        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.base = torch.cuda.memory_allocated()

    def peak_bytes(self) -> int:
        import torch

        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - self.base


def build(args, device):
    import torch

    import upcycle
    from upcycle.testing import tiny_model
    from upcycle.train.objective import Objective

    if args.model:  # a real dense checkpoint (e.g. SmolLM2-135M): whole-model steps
        dense = upcycle.load(args.model)
    else:
        dense = tiny_model("qwen2", vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
                           num_hidden_layers=args.layers, num_attention_heads=args.heads,
                           num_key_value_heads=args.kv_heads, max_position_embeddings=max(args.seq_lens))
    cfg = upcycle.BankSparseConfig(bank_size=args.bank_size, keep=args.keep, predictor=args.predictor,
                                   predictor_budget=args.predictor_budget)
    sparse = upcycle.convert(copy.deepcopy(dense), cfg, progress=False)
    dense = upcycle.to_dense(copy.deepcopy(sparse))  # the sparse model's dense parent, same weights
    models = {}
    for name, m in (("sparse", sparse), ("dense", dense)):
        m.set_attn_implementation("sdpa")
        m.config.use_cache = False
        if args.grad_ckpt:
            m.activation_checkpointing_enable()
        m.to(device).train()
        obj = Objective(m, chunk_tokens=args.loss_chunk)
        opt = torch.optim.AdamW(obj.parameters(), lr=1e-5)
        models[name] = (obj, opt)
    return models


def state_bytes(obj, opt) -> int:
    params = sum(p.numel() * p.element_size() for p in obj.parameters())
    moments = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if hasattr(t, "numel"))
    return params + moments


def measure(args) -> list[dict]:
    """One sequence length (runs in its own process)."""
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    seq = args.seq_lens[0]
    mem = CudaMemory() if device.type == "cuda" else CpuMemory()
    models = build(args, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" or args.bf16)
    gen = torch.Generator().manual_seed(0)
    vocab = next(iter(models.values()))[0].model.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, seq), generator=gen).to(device)
    wall = {name: [] for name in models}

    def step(name):
        obj, opt = models[name]
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        with autocast:
            loss = obj(ids)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall[name].append(time.perf_counter() - t0)  # (memory steps included; "wall_s" keeps the timed ones)
        # CPU: the process's CPU time, which other processes' load on shared cores does not inflate
        return wall[name][-1] if device.type == "cuda" else time.process_time() - c0

    for name in models:  # warm-up; creates the AdamW moments
        step(name)
    peaks = {}
    for name in models:
        mem.start()
        step(name)
        peaks[name] = mem.peak_bytes()
    mem.done()
    times = abba({"sparse": lambda: step("sparse"), "dense": lambda: step("dense")}, args.reps)
    rows = []
    for name in ("sparse", "dense"):
        t = statistics.median(times[name])
        state = state_bytes(*models[name])
        rows.append({"seq_len": seq, "method": name, "step_s": t, "tokens_per_s": args.batch * seq / t,
                     "peak_mb": (state + peaks[name]) / 2**20, "step_mb": peaks[name] / 2**20,
                     "state_mb": state / 2**20, "times_s": times[name], "wall_s": wall[name][-args.reps:],
                     "device": device.type,
                     "threads": torch.get_num_threads() if device.type == "cpu" else None})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 2048, 4096])
    # default layer shape: Qwen2.5-0.5B's (d 896, d_ff 4864 = 76 banks of 64, 14 heads / 2 KV heads), one layer,
    # a small vocabulary so the LM head does not hide the FFN in the step time
    p.add_argument("--hidden", type=int, default=896)
    p.add_argument("--ffn", type=int, default=4864)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--heads", type=int, default=14)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--model", default=None, help="a dense checkpoint to time whole-model steps of (default: a random "
                   "model of the --hidden/--ffn/--layers shape)")
    p.add_argument("--predictor", choices=["auto", "shadow", "lowrank"], default="auto",
                   help="the sparse model's predictor (auto: what the budget rule picks, the default)")
    p.add_argument("--predictor-budget", type=float, default=0.10)
    p.add_argument("--batch", type=int, default=1, help="sequences per step")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast on CPU too (both methods)")
    p.add_argument("--bank-size", type=int, default=64)
    p.add_argument("--keep", type=int, default=16)
    p.add_argument("--reps", type=int, default=3, help="timed steps per method (median reported)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (1: steadier on shared cores)")
    p.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing on both models")
    p.add_argument("--loss-chunk", type=int, default=2048)
    p.add_argument("--cpu", action="store_true", help="CPU even if a GPU is visible")
    p.add_argument("--out", default=None, help="results stem (default bench/results/train_step_{cpu,cuda})")
    p.add_argument("--_one", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._one:
        print("ROWS " + json.dumps(measure(args)), flush=True)
        return 0

    import torch

    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    if device == "cpu":
        torch.set_num_threads(args.threads)  # what the children run with
    record = {"machine": machine_record(device, argv, __file__),
              "config": {k: v for k, v in vars(args).items() if not k.startswith("_")}}
    rows = []
    for seq in args.seq_lens:
        cmd = [sys.executable, __file__, "--_one", *_passthrough(argv), "--seq-lens", str(seq)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("ROWS ")), None)
        if proc.returncode or line is None:
            print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
            return 1
        rows += json.loads(line[5:])
        _print_rows(rows[-2:], header=len(rows) == 2)
    stem = Path(args.out) if args.out else RESULTS / f"train_step_{device}"
    ratios = _ratios(rows)
    print("\nsparse / dense")
    print(f"{'seq_len':>8} {'time':>7} {'peak mem':>9} {'step mem':>9}")
    for r in ratios:
        print(f"{r['seq_len']:>8} {r['time']:>6.3f}x {r['peak_mem']:>8.3f}x {r['step_mem']:>8.3f}x")
    what = "CPU time of the process" if device == "cpu" else "synchronized wall time"
    if args.model:  # a real checkpoint's own shape
        c = json.loads((Path(args.model) / "config.json").read_text())
        shape = (f"the whole model {Path(args.model).name} (d {c['hidden_size']}, d_ff {c['intermediate_size']}, "
                 f"{c['num_hidden_layers']} layers, vocabulary {c['vocab_size']})")
    else:
        shape = f"layer shape d {args.hidden}, d_ff {args.ffn}, {args.layers} layer(s), vocabulary {args.vocab}"
    notes = [f"One step = forward + backward + AdamW of the `upcycle.train` objective, batch 1"
             f"{', bf16 autocast' if args.bf16 else ''}; {shape}, keep {args.keep} of "
             f"{args.bank_size}{', activation checkpointing' if args.grad_ckpt else ''}. step s: the median of "
             f"{args.reps} steps per method ({what}), the methods alternating (ABBA). peak MB = state (weights + "
             "AdamW moments) + step MB (the step's peak above what was resident before it)."]
    columns = [("seq_len", "seq_len"), ("method", "method"), ("step s", "step_s", ".3f"),
               ("tokens/s", "tokens_per_s", ".0f"), ("peak MB", "peak_mb", ".1f"), ("step MB", "step_mb", ".1f"),
               ("state MB", "state_mb", ".1f")]
    ratio_columns = [("seq_len", "seq_len"), ("method", lambda r: "sparse / dense"), ("time", "time", ".3f"),
                     ("peak mem", "peak_mem", ".3f"), ("step mem", "step_mem", ".3f")]
    write_result(stem.name, record, rows, columns, f"Training step, bank-sparse vs dense ({device})", notes,
                 tables=[Table(ratios, ratio_columns, "Ratios", key="ratios")], out=stem.parent, csv_rows=True)
    return 0


def _passthrough(argv) -> list[str]:
    """The user's flags minus --seq-lens (each child gets one length)."""
    out, skip = [], False
    for a in (argv if argv is not None else sys.argv[1:]):
        if a == "--seq-lens":
            skip = True
            continue
        if skip and not a.startswith("--"):
            continue
        skip = False
        out.append(a)
    return out


def _ratios(rows: list[dict]) -> list[dict]:
    by = {(r["seq_len"], r["method"]): r for r in rows}
    return [{"seq_len": s, "time": by[s, "sparse"]["step_s"] / by[s, "dense"]["step_s"],
             "peak_mem": by[s, "sparse"]["peak_mb"] / by[s, "dense"]["peak_mb"],
             "step_mem": by[s, "sparse"]["step_mb"] / by[s, "dense"]["step_mb"]}
            for s in sorted({r["seq_len"] for r in rows})]


def _print_rows(rows: list[dict], header: bool) -> None:
    if header:
        print(f"{'seq_len':>8} {'method':>7} {'step_s':>8} {'tok/s':>8} {'peak_mb':>9} {'step_mb':>9}")
    for r in rows:
        print(f"{r['seq_len']:>8} {r['method']:>7} {r['step_s']:>8.3f} {r['tokens_per_s']:>8.0f} "
              f"{r['peak_mb']:>9.1f} {r['step_mb']:>9.1f}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
