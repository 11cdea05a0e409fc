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

Writes bench/results/decode_<device>[_<tag>].json (FFN rows under `rows`, `e2e`), .csv and .md.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from common import RESULTS, Table, abba, device_name, machine_record, quartiles, sync, time_interleaved, write_result
from torch import nn

from upcycle.kernels import kernel_mode, use_kernels
from upcycle.kernels.reference import bank_topk_indices, predictor_logits
from upcycle.recipes.bank_sparse import BankSparseSwiGLU, runtime
from upcycle.recipes.bank_sparse.predictors import choose_predictor

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


def make_providers(args, copies: list[BankSparseSwiGLU]) -> dict:
    """name -> fn(module, x); `dense` runs the same weights as plain F.linear SwiGLU."""
    dense_mods = {id(m): DenseFFN(m) for m in copies}

    def dense(m, x):
        return dense_mods[id(m)](x)

    def run_mode(mode, layout="split"):
        def fn(m, x):
            with use_kernels(mode, layout=layout):
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

        def shadow_fn(m, x, twins=twins, dots="int16"):
            with use_kernels("fused", layout="split", shadow_dots=dots):
                return twins[id(m)](x)

        variants = {"": shadow_fn}
        if args.shadow_float_dots and copies[0].gate_proj.weight.device.type == "cpu":
            variants["-floatdots"] = lambda m, x, fn=shadow_fn: fn(m, x, dots="float")
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
                with use_kernels("fused"):
                    ok = runtime.decode_forward(m0, x) is not None
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
                    # warm-up: every copy once (kernel build, decode caches), then copy 0 again for the pace
                    fns = {k: lambda i, fn=fn, cs=copies, x=x: fn(cs[i % len(cs)], x) for k, fn in active.items()}
                    times = time_interleaved(fns, device, budget_s=args.budget, min_iters=args.min_iters,
                                             max_iters=args.max_iters, warmup=len(copies) + 1)
            med = {k: statistics.median(v) for k, v in times.items()}
            best_dense = min(v for k, v in med.items() if k.startswith("dense"))
            best_dense_min = min(min(v) for k, v in times.items() if k.startswith("dense"))
            for k, v in times.items():
                sparse = k.startswith("sparse") and k != "sparse-reference"
                nbytes = ffn_bytes(d, d_ff, r, es, union if sparse else None)
                if k in SHADOW_BYTES:  # the shadow's codes and scales instead of the rank-r predictor
                    nbytes += SHADOW_BYTES[k](d, d_ff) - (r * d + d_ff * r + d_ff) * es
                q = quartiles(v)
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
                        p25_us=q["p25"] * 1e6,
                        p75_us=q["p75"] * 1e6,
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
    from upcycle import BankSparseConfig
    from upcycle.recipes.bank_sparse.convert import convert, find_swiglu_ffns

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

    def generate_run(mode: str, layout: str = "split") -> tuple[float, list[float]]:
        """(tokens/s of the whole generate call, the decode-step durations after the first token)."""
        timer = StepTimer()
        with torch.no_grad(), use_kernels(mode, layout=layout):
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
        runtime.prepare(model, layout)

    def use(ffns: dict) -> None:
        for name, m in ffns.items():
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, m)

    with torch.no_grad():
        model.generate(ids, **{**gen, "max_new_tokens": 2, "min_new_tokens": 2})
    runs = {"dense": lambda: (use(dense_ffns), generate_run("auto"))[1]}
    runs["sparse-fused"] = lambda: (use(sparse_ffns), generate_run("auto", "split"))[1]
    if args.bundle:
        runs["sparse-fused-bundle"] = lambda: (use(sparse_ffns), generate_run("auto", "bundle"))[1]
    if args.reference:
        runs["sparse-reference"] = lambda: (use(sparse_ffns), generate_run("reference"))[1]
    results = abba(runs, args.e2e_reps)  # [(whole-call tokens/s, decode-step times)] per run
    totals = {k: [tps for tps, _ in v] for k, v in results.items()}
    steps = {k: [s for _, st in v for s in st] for k, v in results.items()}
    rows = []
    model_name = f"random Qwen2.5-{'7B' if device == 'cuda' else '0.5B'}-shaped, {cfg.num_hidden_layers} layers"
    dense_step = statistics.median(steps["dense"])
    for k in runs:
        # Robust to other processes' bursts: the median decode-step time over all runs' steps.
        q = quartiles(steps[k])
        step = q["median"]
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
                p25_step_ms=q["p25"] * 1e3,
                p75_step_ms=q["p75"] * 1e3,
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


FFN_COLUMNS = [("shape", "shape"), ("batch", "batch"), ("provider", "provider"), ("median us", "median_us", ".0f"),
               ("p25-p75 us", lambda r: f"{r['p25_us']:.0f}-{r['p75_us']:.0f}"),
               ("x dense", lambda r: f"**{r['speedup_vs_best_dense']:.2f}**"), ("min us", "min_us", ".0f"),
               ("x dense (mins)", "speedup_of_mins", ".2f"), ("bytes MB", lambda r: f"{r['bytes'] / 1e6:.1f}"),
               ("GB/s", "achieved_GBs", ".1f"), ("floor us", "floor_us", ".0f")]
E2E_COLUMNS = [("model", "model"), ("batch", "batch"), ("prompt", "prompt"), ("new tokens", "new_tokens"),
               ("provider", "provider"), ("decode tok/s", "decode_tokens_per_s", ".2f"),
               ("x dense", lambda r: f"**{r['speedup_vs_dense']:.2f}**"), ("median step ms", "median_step_ms", ".1f"),
               ("p25-p75 ms", lambda r: f"{r['p25_step_ms']:.0f}-{r['p75_step_ms']:.0f}"),
               ("whole-generate tok/s per run", lambda r: ", ".join(f"{t:.2f}" for t in r["generate_tokens_per_s"])),
               ("x dense (whole, medians)", "generate_speedup_vs_dense", ".2f")]


def write(args, device: str, record: dict, ffn: list[dict], e2e: list[dict]) -> None:
    notes = [f"dtype {record['dtype']}, copy bandwidth {record['copy_bandwidth_GBs']:.1f} GB/s (read+write). "
             "Times are medians of interleaved runs (providers alternate in one loop); the machine may be shared, "
             "so absolute times are noisy and the ratios are the result. x = speedup over the best dense provider "
             "(medians); x (mins) = the same ratio of the fastest runs, the least disturbed by other processes."]
    e2e_notes = ["Decode tokens/s = batch / median decode-step time over all runs (steps timed inside `generate` by "
                 "a logits processor); runs alternate dense and converted (ABBA). Whole-call tokens/s per run "
                 "(including the prefill) are listed for reference."]
    e2e_table = Table(e2e, E2E_COLUMNS, "End-to-end `generate` (greedy, same HF engine; dense = the original HF "
                      "MLPs, same weights)", e2e_notes, key="e2e")
    write_result(f"decode_{device}{'_' + args.tag if args.tag else ''}", record, ffn, FFN_COLUMNS,
                 f"Decode benchmark: {record['machine']['device_name']}", notes, tables=[e2e_table], out=args.out,
                 csv_rows=True)


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
    p.add_argument("--out", default=str(RESULTS), help="results folder")
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
    print(f"device: {device_name(device)}; copy bandwidth {bw / 1e9:.1f} GB/s; kernels mode {kernel_mode()}")
    record = dict(machine=machine_record(device, argv, __file__), dtype=str(dtype).replace("torch.", ""),
                  copy_bandwidth_GBs=bw / 1e9)
    ffn = [] if args.no_ffn else bench_ffn(args, device, dtype, bw)
    e2e = [] if args.no_e2e else bench_e2e(args, device, dtype)
    write(args, device, record, ffn, e2e)
    record.update(rows=ffn, e2e=e2e)
    if args.json:
        print(json.dumps(record, indent=1))
    return record


if __name__ == "__main__":
    main()
