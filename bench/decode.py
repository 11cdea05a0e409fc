"""Decode benchmark of the bank-sparse SwiGLU FFN: sparse kernels vs the best dense baseline.

FFN level: one FFN (random weights, 16-of-64 banks, rank-r predictor) at decode shapes, every
provider timed interleaved in the same loop (so a noisy machine slows them alike) through the
module's real forward under no_grad. Several weight copies are cycled so caches do not hold the
weights between calls. Reported: median time, speedup over the best dense provider, bytes the
call must read, achieved GB/s and the bytes floor at the measured copy bandwidth.

End to end: HF `generate` (greedy, same engine) tokens/s, dense vs converted, for a random-weight
Qwen2.5-0.5B-shaped model on CPU (Qwen2.5-7B-shaped on CUDA).

    python bench/decode.py --device cpu              # default: all shapes, batch 1..16, e2e
    python bench/decode.py --device cpu --shapes qwen2.5-0.5b --batches 1,4 --no-e2e
    python bench/decode.py --device cuda --dtype bfloat16

Writes bench/results/decode_<device>.json, .csv and .md (device name inside).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from upcycle.modules.bank_sparse import BankSparseSwiGLU
from upcycle.modules.predictors import choose_predictor

from upcycle.kernels import dispatch
from upcycle.kernels.reference import bank_topk_indices, predictor_logits

SHAPES = {  # name: (hidden d, intermediate d_ff)
    "qwen2.5-0.5b": (896, 4864),
    "qwen2.5-7b": (3584, 18944),
    "llama-3-8b": (4096, 14336),
}
BANK, KEEP = 64, 16
SHADOW_BUDGET_FOR_BITS = {2: 0.10, 3: 0.15, 4: 0.2, 5: 0.35, 6: 0.35, 7: 0.35, 8: 0.35}
SHADOW_BYTES: dict = {}  # provider -> fn(d, d_ff): bytes its packed shadow predictor reads per call


def rank_for(d: int) -> int:
    return min(256, max(16, d // 8))  # BankSparseConfig's default predictor rank


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device: str, nbytes: int = 256 << 20) -> float:
    """(read + write) bytes per second of a large tensor copy: the memory roof the floor uses."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    times = []
    for _ in range(7):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * nbytes / statistics.median(times[2:])


class DenseFFN(nn.Module):
    def __init__(self, m: BankSparseSwiGLU):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = m.gate_proj, m.up_proj, m.down_proj

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def make_ffn(d: int, d_ff: int, dtype: torch.dtype, device: str) -> BankSparseSwiGLU:
    lin = lambda i, o: nn.Linear(i, o, bias=False, dtype=dtype, device=device)  # noqa: E731
    m = BankSparseSwiGLU(lin(d, d_ff), lin(d, d_ff), lin(d_ff, d), nn.SiLU(), BANK, KEEP, rank_for(d))
    with torch.no_grad():
        m.predictor.out_proj.bias.normal_(0, 0.1)
    return m.eval()


def ffn_bytes(d: int, d_ff: int, r: int, es: int, rows: float | None) -> float:
    """Weight bytes one call must read: all 3 matrices (rows None) or `rows` bundles + predictor."""
    if rows is None:
        return 3 * d * d_ff * es
    return (r * d + d_ff * r + d_ff) * es + rows * 3 * d * es


def time_providers(providers: dict, copies: list, x, device: str, budget_s: float, min_iters: int, max_iters: int):
    """Interleaved timing: each iteration runs every provider once on the next weight copy."""
    times = {k: [] for k in providers}
    for fn in providers.values():  # warm-up (builds kernels and decode caches)
        for m in copies:
            fn(m, x)
    sync(device)
    # Estimate the iteration cost to fit the budget.
    t0 = time.perf_counter()
    for fn in providers.values():
        fn(copies[0], x)
    sync(device)
    per_iter = max(time.perf_counter() - t0, 1e-6)
    iters = int(min(max_iters, max(min_iters, budget_s / per_iter)))
    for it in range(iters):
        m = copies[it % len(copies)]
        for k, fn in providers.items():
            sync(device)
            t0 = time.perf_counter()
            fn(m, x)
            sync(device)
            times[k].append(time.perf_counter() - t0)
    return times


def make_providers(args, copies: list[BankSparseSwiGLU]) -> dict:
    """name -> fn(module, x); `dense` runs the same weights as plain F.linear SwiGLU."""
    dense_mods = {id(m): DenseFFN(m) for m in copies}

    def dense(m, x):
        return dense_mods[id(m)](x)

    def run_mode(mode, layout=None):
        def fn(m, x):
            with dispatch.use_kernels(mode, layout):
                return m(x)

        return fn

    def dense_per_token(m, x):
        # Per-token GEMVs: on some BLAS builds small-M GEMM is slower than M GEMVs; the best counts.
        w_g, w_u, w_d = m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight
        xs = x.reshape(-1, x.shape[-1])
        return torch.stack([torch.mv(w_d, F.silu(torch.mv(w_g, v)) * torch.mv(w_u, v)) for v in xs]).view_as(x)

    providers = {"dense": dense, "dense-per-token": dense_per_token}
    if args.compile:
        compiled = torch.compile(DenseFFN(copies[0]), dynamic=True)

        def dense_compiled(m, x):
            compiled.gate_proj, compiled.up_proj, compiled.down_proj = m.gate_proj, m.up_proj, m.down_proj
            return compiled(x)

        providers["dense-compiled"] = dense_compiled
    providers["sparse-fused"] = run_mode("fused", "split")
    for bits in args.shadow_bits:
        d, d_ff = copies[0].hidden_size, copies[0].intermediate_size
        # the group a user gets: the library's budget rule at the budget where `bits` is its choice
        group = choose_predictor(SHADOW_BUDGET_FOR_BITS[bits], d, d_ff, kind="shadow", bits=bits)["shadow_group_size"]
        twins = {id(m): BankSparseSwiGLU(m.gate_proj, m.up_proj, m.down_proj, nn.SiLU(), BANK, KEEP,
                                         shadow=(bits, group)).eval() for m in copies}

        def shadow_fn(m, x, twins=twins):
            with dispatch.use_kernels("fused", "split"):
                return twins[id(m)](x)

        def shadow_float_fn(m, x, shadow_fn=shadow_fn):
            os.environ["UPCYCLE_SHADOW_FLOAT_DOTS"] = "1"  # the C kernel reads it on every call
            try:
                return shadow_fn(m, x)
            finally:
                del os.environ["UPCYCLE_SHADOW_FLOAT_DOTS"]

        variants = {"": shadow_fn}
        if args.shadow_float_dots and copies[0].gate_proj.weight.device.type == "cpu":
            variants["-floatdots"] = shadow_float_fn
        for suffix, fn in variants.items():
            providers[f"sparse-fused-shadow{bits}-g{group}{suffix}"] = fn
            SHADOW_BYTES[f"sparse-fused-shadow{bits}-g{group}{suffix}"] = lambda d, d_ff, bits=bits, group=group: (
                2 * d * d_ff * (2 if bits <= 2 else 4 if bits <= 4 else 8) / 8 + 4 * 2 * d_ff * d / group)
    if args.bundle:
        providers["sparse-fused-bundle"] = run_mode("fused", "bundle")
    if not args.no_torch_path:
        providers["sparse-torch"] = run_mode("torch")
    if args.reference:
        providers["sparse-reference"] = run_mode("reference")
    return providers


def time_providers_cuda(providers: dict, copies: list, x, iters: int) -> dict:
    """GPU timing: each (provider, weight copy) captured once as a CUDA graph (launch overhead out, as
    in a graph-captured decode step), replays interleaved across providers and timed with events."""
    graphs = {}
    stream = torch.cuda.Stream()
    for k, fn in providers.items():
        for i, m in enumerate(copies):
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(3):  # warm-up: Triton compiles, decode caches are built
                    fn(m, x)
            torch.cuda.current_stream().wait_stream(stream)
            try:
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    fn(m, x)
                graphs[k, i] = g.replay
            except Exception as e:  # not capturable: time it eagerly (launch overhead included)
                print(f"  {k}: CUDA graph capture failed ({type(e).__name__}); timing eagerly")
                graphs[k, i] = lambda fn=fn, m=m: fn(m, x)
    events = {k: [] for k in providers}
    for it in range(iters):
        i = it % len(copies)
        for k in providers:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graphs[k, i]()
            end.record()
            events[k].append((start, end))
    torch.cuda.synchronize()
    return {k: [s.elapsed_time(e) / 1e3 for s, e in v[len(copies) :]] for k, v in events.items()}


def bench_ffn(args, device: str, dtype: torch.dtype, bw: float) -> list[dict]:
    rows = []
    es = torch.finfo(dtype).bits // 8
    cache_bytes = (64 << 20) if device == "cpu" else (60 << 20)  # > L3 (CPU) / L2 (H100)
    for name in args.shapes:
        d, d_ff = SHAPES[name]
        r = rank_for(d)
        sparse_b1 = ffn_bytes(d, d_ff, r, es, d_ff * KEEP / BANK)
        n_copies = max(2, min(args.max_copies, math.ceil(4 * cache_bytes / sparse_b1)))
        torch.manual_seed(0)
        copies = [make_ffn(d, d_ff, dtype, device) for _ in range(n_copies)]
        providers = make_providers(args, copies)
        for T in args.batches:
            x = torch.randn(T, 1, d, dtype=dtype, device=device)
            with torch.no_grad():
                m0 = copies[0]
                z = predictor_logits(
                    x.reshape(T, d),
                    m0.predictor.in_proj.weight,
                    m0.predictor.out_proj.weight,
                    m0.predictor.out_proj.bias,
                )
                union = bank_topk_indices(z, BANK, KEEP).unique().numel()
                with dispatch.use_kernels("fused"):
                    ok = dispatch.decode_forward(m0, x) is not None
                active = {
                    k: v
                    for k, v in providers.items()
                    if (not k.startswith("sparse-fused") or ok)
                    and (k != "sparse-torch" or T <= args.torch_path_max_batch)
                    and (k != "dense-per-token" or T > 1)
                }
                if not ok:
                    print(f"  [{name} T={T}] no fused path here (UPCYCLE_DECODE_MAX_TOKENS / device); skipped")
                if device == "cuda":
                    times = time_providers_cuda(active, copies, x, args.max_iters + len(copies))
                else:
                    times = time_providers(active, copies, x, device, args.budget, args.min_iters, args.max_iters)
            med = {k: statistics.median(v) for k, v in times.items()}
            best_dense = min(v for k, v in med.items() if k.startswith("dense"))
            best_dense_min = min(min(v) for k, v in times.items() if k.startswith("dense"))
            for k, v in times.items():
                sparse = k.startswith("sparse") and k != "sparse-reference"
                nbytes = ffn_bytes(d, d_ff, r, es, union if sparse else None)
                if k in SHADOW_BYTES:  # the shadow's codes and scales instead of the rank-r predictor
                    nbytes += SHADOW_BYTES[k](d, d_ff) - (r * d + d_ff * r + d_ff) * es
                q = statistics.quantiles(v, n=4) if len(v) >= 4 else [min(v), med[k], max(v)]
                rows.append(
                    dict(
                        shape=name,
                        d=d,
                        d_ff=d_ff,
                        rank=r,
                        dtype=str(dtype).replace("torch.", ""),
                        batch=T,
                        provider=k,
                        median_us=med[k] * 1e6,
                        p25_us=q[0] * 1e6,
                        p75_us=q[2] * 1e6,
                        iters=len(v),
                        speedup_vs_best_dense=best_dense / med[k],
                        min_us=min(v) * 1e6,
                        speedup_of_mins=best_dense_min / min(v),
                        bytes=nbytes,
                        union_channels=union if sparse else d_ff,
                        achieved_GBs=nbytes / med[k] / 1e9,
                        floor_us=nbytes / bw * 1e6,
                        copies=n_copies,
                    )
                )
                print(
                    f"{name:13s} T={T:<3d} {k:17s} {med[k] * 1e6:10.1f} us  x{best_dense / med[k]:5.2f}  "
                    f"(mins x{best_dense_min / min(v):5.2f})  "
                    f"{nbytes / med[k] / 1e9:7.1f} GB/s  floor {nbytes / bw * 1e6:9.1f} us",
                    flush=True,
                )
        del copies, providers
    return rows


def e2e_model(device: str, dtype: torch.dtype, layers: int | None):
    import transformers

    if device == "cuda":  # Qwen2.5-7B shape
        cfg = transformers.Qwen2Config(
            vocab_size=152064,
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=layers or 28,
            num_attention_heads=28,
            num_key_value_heads=4,
            max_position_embeddings=4096,
            tie_word_embeddings=False,
        )
    else:  # Qwen2.5-0.5B shape
        cfg = transformers.Qwen2Config(
            vocab_size=151936,
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=layers or 24,
            num_attention_heads=14,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            tie_word_embeddings=True,
        )
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval(), cfg


def bench_e2e(args, device: str, dtype: torch.dtype) -> list[dict]:
    from upcycle.config import BankSparseConfig
    from upcycle.convert import convert, find_swiglu_ffns

    model, cfg = e2e_model(device, dtype, args.e2e_layers)
    torch.manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (args.e2e_batch, args.prompt), device=device)
    gen = dict(
        max_new_tokens=args.new_tokens,
        min_new_tokens=args.new_tokens,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
    )

    from transformers import LogitsProcessor, LogitsProcessorList

    class StepTimer(LogitsProcessor):
        """Called once per generated token, after that step's forward: stamps the step times."""

        def __init__(self):
            self.stamps: list[float] = []

        def __call__(self, input_ids, scores):
            sync(device)
            self.stamps.append(time.perf_counter())
            return scores

    def generate_run(mode: str | None, layout: str | None = None) -> tuple[float, list[float]]:
        """(tokens/s of the whole generate call, the decode-step durations after the first token)."""
        timer = StepTimer()
        with torch.no_grad(), dispatch.use_kernels(mode or "auto", layout):
            sync(device)
            t0 = time.perf_counter()
            out = model.generate(ids, logits_processor=LogitsProcessorList([timer]), **gen)
            sync(device)
        steps = [b - a for a, b in zip(timer.stamps, timer.stamps[1:])]
        return (out.shape[1] - ids.shape[1]) * ids.shape[0] / (time.perf_counter() - t0), steps

    with torch.no_grad():
        model.generate(ids, **{**gen, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
    # Keep the original HF MLPs: runs alternate dense / converted on the same model (and the same
    # FFN weight tensors) by swapping the modules, so load on a shared machine hits both alike.
    dense_ffns = {name: m for name, _, m in find_swiglu_ffns(model)}
    kind = {"predictor": "lowrank", "predictor_rank": rank_for(cfg.hidden_size)} if args.predictor == "lowrank" else \
        {"predictor": "shadow", "predictor_budget": args.predictor_budget}
    convert(model, BankSparseConfig(predictor_init="random", **kind), progress=False)
    model.eval()
    sparse_ffns = {name: model.get_submodule(name) for name in dense_ffns}
    layouts = ["split", "bundle"] if args.bundle else ["split"]
    for layout in layouts:
        dispatch.prepare(model, layout)

    def use(ffns: dict) -> None:
        for name, m in ffns.items():
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, m)

    with torch.no_grad():
        model.generate(ids, **{**gen, "max_new_tokens": 2, "min_new_tokens": 2})
    runs = {"dense": lambda: (use(dense_ffns), generate_run(None))[1]}
    runs["sparse-fused"] = lambda: (use(sparse_ffns), generate_run("auto", "split"))[1]
    if args.bundle:
        runs["sparse-fused-bundle"] = lambda: (use(sparse_ffns), generate_run("auto", "bundle"))[1]
    if args.reference:
        runs["sparse-reference"] = lambda: (use(sparse_ffns), generate_run("reference"))[1]
    totals: dict[str, list[float]] = {k: [] for k in runs}
    steps: dict[str, list[float]] = {k: [] for k in runs}
    for rep in range(args.e2e_reps):  # ABBA order: a drifting machine load biases no provider
        for k in runs if rep % 2 == 0 else reversed(runs):
            tps, st = runs[k]()
            totals[k].append(tps)
            steps[k].extend(st)
    rows = []
    model_name = f"random Qwen2.5-{'7B' if device == 'cuda' else '0.5B'}-shaped, {cfg.num_hidden_layers} layers"
    dense_step = statistics.median(steps["dense"])
    for k in runs:
        # Robust to other processes' bursts: the median decode-step time over all runs' steps.
        step = statistics.median(steps[k])
        rows.append(
            dict(
                model=model_name,
                provider=k,
                batch=args.e2e_batch,
                prompt=args.prompt,
                new_tokens=args.new_tokens,
                decode_tokens_per_s=args.e2e_batch / step,
                speedup_vs_dense=dense_step / step,
                median_step_ms=step * 1e3,
                p25_step_ms=statistics.quantiles(steps[k], n=4)[0] * 1e3,
                p75_step_ms=statistics.quantiles(steps[k], n=4)[2] * 1e3,
                steps=len(steps[k]),
                generate_tokens_per_s=totals[k],
                generate_speedup_vs_dense=statistics.median(totals[k]) / statistics.median(totals["dense"]),
            )
        )
        print(
            f"e2e {k:20s} {args.e2e_batch / step:7.2f} tok/s (median step {step * 1e3:7.1f} ms)  "
            f"x{dense_step / step:5.2f}   whole-generate tok/s {[round(t, 2) for t in totals[k]]}",
            flush=True,
        )
    return rows


def _fmt_load(load) -> str:
    return "n/a" if not load else ", ".join(f"{v:.1f}" for v in load)


def write(args, device: str, record: dict) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"decode_{device}{'_' + args.tag if args.tag else ''}"
    stem.with_suffix(".json").write_text(json.dumps(record, indent=1))
    if record["ffn"]:
        with stem.with_suffix(".csv").open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(record["ffn"][0]))
            w.writeheader()
            w.writerows(record["ffn"])
    lines = [
        f"# Decode benchmark: {record['device_name']}",
        "",
        f"`{record['command']}`  ",
        f"torch {record['torch']}, dtype {record['dtype']}, threads {record['threads']}, "
        f"copy bandwidth {record['copy_bandwidth_GBs']:.1f} GB/s (read+write), {record['date']}.",
        "Times are medians of interleaved runs (providers alternate in one loop); the machine may be shared,",
        "so absolute times are noisy and the ratios are the result. x = speedup over the best dense provider",
        "(medians); x (mins) = the same ratio of the fastest runs, the least disturbed by other processes.",
        f"Load average (1, 5, 15 min) at start {_fmt_load(record['load_average'])}, "
        f"at end {_fmt_load(record.get('load_average_end'))}.",
        "",
    ]
    if record["ffn"]:
        lines += [
            "| shape | batch | provider | median us | p25-p75 us | x dense | min us | x dense (mins) "
            "| bytes MB | GB/s | floor us |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
    for r in record["ffn"]:
        lines.append(
            f"| {r['shape']} | {r['batch']} | {r['provider']} | {r['median_us']:.0f} "
            f"| {r['p25_us']:.0f}-{r['p75_us']:.0f} | **{r['speedup_vs_best_dense']:.2f}** | {r['min_us']:.0f} "
            f"| {r['speedup_of_mins']:.2f} | {r['bytes'] / 1e6:.1f} | {r['achieved_GBs']:.1f} | {r['floor_us']:.0f} |"
        )
    if record["e2e"]:
        lines += [
            "",
            "## End-to-end `generate` (greedy, same HF engine; dense = the original HF MLPs, same weights)",
            "",
            "Decode tokens/s = batch / median decode-step time over all runs (steps timed inside `generate`",
            "by a logits processor); runs alternate dense and converted (ABBA). Whole-call tokens/s per run",
            "(including the prefill) are listed for reference.",
            "",
            "| model | batch | prompt | new tokens | provider | decode tok/s | x dense | median step ms "
            "| p25-p75 ms | whole-generate tok/s per run | x dense (whole, medians) |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in record["e2e"]:
            lines.append(
                f"| {r['model']} | {r['batch']} | {r['prompt']} | {r['new_tokens']} | {r['provider']} "
                f"| {r['decode_tokens_per_s']:.2f} | **{r['speedup_vs_dense']:.2f}** | {r['median_step_ms']:.1f} "
                f"| {r['p25_step_ms']:.0f}-{r['p75_step_ms']:.0f} "
                f"| {', '.join(f'{t:.2f}' for t in r['generate_tokens_per_s'])} "
                f"| {r['generate_speedup_vs_dense']:.2f} |"
            )
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.json/.csv/.md")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", default=None, help="default float32 on cpu, bfloat16 on cuda")
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list of {list(SHAPES)}")
    p.add_argument("--batches", default="1,2,4,8,16")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--budget", type=float, default=None, help="seconds of timing per (shape, batch) cell")
    p.add_argument("--min-iters", type=int, default=8)
    p.add_argument("--max-iters", type=int, default=400)
    p.add_argument("--max-copies", type=int, default=16, help="weight copies cycled to defeat caches")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd dense (slow to build on CPU)")
    p.add_argument("--reference", action="store_true", help="also time the dense-masked reference path")
    p.add_argument("--bundle", action="store_true", help="also time the fused path on the `bundle` layout")
    p.add_argument("--no-torch-path", action="store_true", help="skip the torch-ops (embedding_bag) gather path")
    p.add_argument("--torch-path-max-batch", type=int, default=4, help="time the torch-ops path up to this batch")
    p.add_argument("--shadow-bits", type=int, nargs="*", default=[],
                   help="also time the fused (C or Triton) path with a shadow predictor of these bits (group "
                        "size: what the budget rule picks at 0.10 for 2 bits, 0.2 for 4, 0.35 for 8)")
    p.add_argument("--shadow-float-dots", action="store_true",
                   help="CPU: also time the shadow with the float dots instead of the int16 (AVX2) ones")
    p.add_argument("--predictor", choices=["lowrank", "shadow"], default="lowrank", help="e2e model's predictor")
    p.add_argument("--predictor-budget", type=float, default=0.10, help="e2e: the shadow's budget")
    p.add_argument("--no-ffn", action="store_true")
    p.add_argument("--no-e2e", action="store_true")
    p.add_argument("--e2e-layers", type=int, default=None, help="layers of the e2e model (default: the real count)")
    p.add_argument("--e2e-batch", type=int, default=1)
    p.add_argument("--e2e-reps", type=int, default=4)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--json", action="store_true", help="also print the JSON record to stdout")
    p.add_argument("--tag", default="", help="suffix of the result files: decode_<device>_<tag>.*")
    args = p.parse_args(argv)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device")
    if device == "cpu":
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype or ("float32" if device == "cpu" else "bfloat16"))
    args.shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    args.batches = [int(b) for b in args.batches.split(",")]
    args.budget = args.budget if args.budget is not None else (2.5 if device == "cpu" else 1.0)
    bw = copy_bandwidth(device)
    print(f"device: {device_name(device)}; copy bandwidth {bw / 1e9:.1f} GB/s; kernels mode {dispatch.kernel_mode()}")
    record = dict(
        device=device,
        device_name=device_name(device),
        torch=torch.__version__,
        dtype=str(dtype).replace("torch.", ""),
        threads=torch.get_num_threads(),
        copy_bandwidth_GBs=bw / 1e9,
        date=time.strftime("%Y-%m-%d %H:%M"),
        command="python bench/decode.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        load_average=os.getloadavg() if hasattr(os, "getloadavg") else None,
        ffn=[],
        e2e=[],
    )
    if not args.no_ffn:
        record["ffn"] = bench_ffn(args, device, dtype, bw)
    if not args.no_e2e:
        record["e2e"] = bench_e2e(args, device, dtype)
    record["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    write(args, device, record)
    if args.json:
        print(json.dumps(record, indent=1))
    return record


if __name__ == "__main__":
    main()
