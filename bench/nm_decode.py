"""Decode benchmark of 2:4 linears on CPU: the N:M kernel (kernels/cpu/nm.py) vs dense F.linear.

Linear level: the Qwen2.5-0.5B FFN linears (gate/up 896 -> 4864, down 4864 -> 896), random exactly-2:4 weights,
fp32 and bf16, at 1..16 tokens. Every provider is timed interleaved in one loop (bench/common.py), each cycling
through its own weight copies (>= 1 GiB in all) so that, as in decode, a layer's weights are not in cache when
it runs. `dense` is F.linear with weight and x in the same dtype; the kernel's time includes its Python wrapper.
The token crossover of recipes/nm/runtime.py (MAX_TOKENS) comes from these rows.

End to end: greedy `generate` of SmolLM2-135M made 2:4 (magnitude; speed does not depend on which weights are
kept) on its FFN linears, and on FFN + attention, vs the dense parent, fp32 and bf16: decode tokens/s from the
median step time (ABBA runs). Also the bank-sparse model and the stacked one (bank-sparse on the 2:4 model).

    python bench/nm_decode.py                 # all
    python bench/nm_decode.py --no-e2e --tokens 1,2,4

Writes bench/results/nm_decode_cpu.json and .md.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from common import Table, abba, machine_record, quartiles, time_interleaved, write_result

from upcycle.kernels import use_kernels
from upcycle.kernels.cpu import nm
from upcycle.kernels.nm_packing import pack_nm24

SHAPES = {"gate/up 896->4864": (4864, 896), "down 4864->896": (896, 4864)}  # (out, in)
DENSE = "/work/cache/smollm2-135m-dense"


def sparse_weight(out: int, inp: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    w = torch.randn(out, inp, generator=gen) / inp**0.5
    keep = w.abs().reshape(out, -1, 4).topk(2, dim=-1).indices
    mask = torch.zeros(out, inp // 4, 4, dtype=torch.bool).scatter_(-1, keep, True).reshape(out, inp)
    return (w * mask).to(dtype)


def make_providers(x: torch.Tensor, ws: list, packs: list, paths: list[str]) -> dict:
    n = len(ws)
    providers = {"dense": lambda i: F.linear(x, ws[i % n])}
    for path in paths:
        if path in nm.available_paths() or path == "auto":
            providers[f"nm-{path}"] = lambda i, path=path: nm.nm24_linear(x, packs[i % n].values, packs[i % n].indices,
                                                                          path=path)
    return providers


def bench_linears(args) -> list[dict]:
    rows = []
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for shape_name, (out, inp) in SHAPES.items():
            one = out * inp * dtype.itemsize
            copies = max(4, args.stream_bytes // one)
            ws = [sparse_weight(out, inp, dtype, gen) for _ in range(copies)]
            packs = [pack_nm24(w) for w in ws]
            for T in args.tokens:
                x = torch.randn(T, inp, generator=gen).to(dtype)
                providers = make_providers(x, ws, packs, args.paths)
                times = time_interleaved(providers, "cpu", iters=args.iters, warmup=3)
                dense_med = statistics.median(times["dense"])
                for name, t in times.items():
                    q = quartiles(t)
                    nbytes = one if name == "dense" else packs[0].nbytes
                    rows.append({"dtype": str(dtype).removeprefix("torch."), "linear": shape_name, "tokens": T,
                                 "provider": name, "median_us": q["median"] * 1e6, "p25_us": q["p25"] * 1e6,
                                 "p75_us": q["p75"] * 1e6, "x_dense": dense_med / q["median"],
                                 "weight_mib": nbytes / 2**20, "gb_s": nbytes / q["median"] / 1e9})
                print(f"{rows[-1]['dtype']:9} {shape_name:18} T={T:<3} " + "  ".join(
                    f"{r['provider']} {r['median_us']:.0f}us (x{r['x_dense']:.2f})" for r in rows[-len(times):]),
                    flush=True)
    return rows


def _gen_timer():
    from transformers import LogitsProcessor

    class StepTimer(LogitsProcessor):
        def __init__(self):
            self.stamps: list[float] = []

        def __call__(self, input_ids, scores):
            self.stamps.append(time.perf_counter())
            return scores

    return StepTimer()


def bench_e2e(args) -> list[dict]:
    from transformers import LogitsProcessorList

    import upcycle
    from upcycle.data import tokenize
    from upcycle.io import load_pretrained
    from upcycle.recipes.bank_sparse import runtime as bs_runtime
    from upcycle.recipes.nm import runtime as nm_runtime

    dense, tok = load_pretrained(args.dense)
    text = open("/work/shared/data/wikitext-2-raw-test.txt", encoding="utf-8").read()[-20000:]
    prompt = tokenize(tok, text)[: args.prompt_tokens].unsqueeze(0)
    gen = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
               pad_token_id=tok.eos_token_id, eos_token_id=None)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        models = {"dense parent": upcycle.load(args.dense, dtype=dtype).eval()}
        for targets in ("ffn", "ffn,attention"):
            m = upcycle.load(args.dense, dtype=dtype).eval()
            upcycle.convert(m, upcycle.NMSparseConfig(method="magnitude", targets=targets), progress=False)
            nm_runtime.prepare(m)
            models[f"2:4 {targets.replace(',', '+')}"] = m
        if dtype == torch.float32:  # the bank-sparse kernel's rows (fp32: its measured regime)
            bs = upcycle.load(args.dense, dtype=dtype).eval()
            upcycle.convert(bs, upcycle.BankSparseConfig(), progress=False)
            bs_runtime.prepare(bs)
            models["bank-sparse (shadow)"] = bs
            st = upcycle.load(args.dense, dtype=dtype).eval()
            upcycle.convert(st, upcycle.NMSparseConfig(method="magnitude"), progress=False)
            upcycle.convert(st, upcycle.BankSparseConfig(), progress=False)
            bs_runtime.prepare(st)
            models["stacked: bank-sparse on 2:4 ffn"] = st

        def run(model, mode):
            timer = _gen_timer()
            with torch.no_grad(), use_kernels(mode):
                out = model.generate(prompt, logits_processor=LogitsProcessorList([timer]), **gen)
            return out[0, prompt.shape[1]:], [b - a for a, b in zip(timer.stamps, timer.stamps[1:])]

        runs = {(name, "kernel"): (m, "auto") for name, m in models.items()}
        runs[("2:4 ffn", "reference path")] = (models["2:4 ffn"], "reference")
        for model, mode in runs.values():
            run(model, mode)  # warm-up: kernel builds, caches
        results = abba({k: lambda v=v: run(*v) for k, v in runs.items()}, args.e2e_reps)
        base = statistics.median(s for _, st in results[("dense parent", "kernel")] for s in st)
        ref_tokens = results[("2:4 ffn", "reference path")][-1][0]
        for (name, path), res in results.items():
            step = statistics.median(s for _, st in res for s in st)
            toks = res[-1][0]
            same = None
            if name == "2:4 ffn":
                same = int((toks != ref_tokens).nonzero()[0, 0]) if (toks != ref_tokens).any() else len(ref_tokens)
            rows.append({"dtype": str(dtype).removeprefix("torch."), "model": name,
                         "provider": "dense (HF)" if name == "dense parent" else path, "median_step_ms": step * 1e3,
                         "tokens_per_s": 1 / step, "x_dense": base / step, "same_tokens_as_reference": same})
            print(rows[-1], flush=True)
        del models
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="1,2,4,8,16")
    ap.add_argument("--paths", default="auto,avx2")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--stream-bytes", type=int, default=1 << 30, help="weight bytes cycled per provider")
    ap.add_argument("--no-e2e", action="store_true")
    ap.add_argument("--no-linears", action="store_true")
    ap.add_argument("--dense", default=DENSE)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--e2e-reps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--name", default="nm_decode_cpu", help="result file name under --out")
    args = ap.parse_args(argv)
    args.tokens = [int(t) for t in args.tokens.split(",")]
    args.paths = args.paths.split(",")
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = machine_record("cpu")
    lin = [] if args.no_linears else bench_linears(args)
    e2e = [] if args.no_e2e else bench_e2e(args)
    cols = [("dtype", "dtype"), ("linear", "linear"), ("tokens", "tokens"), ("provider", "provider"),
            ("median us", "median_us", ".0f"), ("p25-p75 us", lambda r: f"{r['p25_us']:.0f}-{r['p75_us']:.0f}"),
            ("x dense", "x_dense", ".2f"), ("weight MiB", "weight_mib", ".1f"), ("GB/s", "gb_s", ".1f")]
    e2e_cols = [("dtype", "dtype"), ("model", "model"), ("provider", "provider"),
                ("decode tokens/s", "tokens_per_s", ".1f"), ("median step ms", "median_step_ms", ".2f"),
                ("x dense", "x_dense", ".2f"),
                ("greedy tokens = reference path's", lambda r: "" if r["same_tokens_as_reference"] is None
                 else f"{r['same_tokens_as_reference']} of {args.new_tokens}")]
    notes = [f"Linears: random exactly-2:4 weights, {args.iters} interleaved iterations per row, each provider "
             f"cycling through ~{args.stream_bytes >> 20} MiB of its own weight copies (cold caches, as in decode); "
             "`nm-auto` = "
             "the path the kernel picks on this CPU (AVX-512 here), `nm-avx2` forced for AVX2-only machines. Times "
             f"include the Python wrapper. Threads: torch's {torch.get_num_threads()} for dense and up to as many for "
             "the kernel (it picks 1 or all per shape by measured time). A shared machine: the load average is "
             "printed above; medians of interleaved runs.",
             f"End to end: greedy `generate`, {args.prompt_tokens}-token WikiText-2 prompt, {args.new_tokens} new "
             f"tokens, {args.e2e_reps} ABBA runs per row; decode tokens/s = 1 / median step time. The 2:4 models are "
             "magnitude-pruned (decode speed does not depend on which weights are kept). Attention and the 49K-token "
             "LM head stay dense in every row."]
    write_result(args.name, {"machine": machine}, lin, cols,
                 "N:M (2:4) decode on CPU: kernel vs dense", notes,
                 tables=[Table(e2e, e2e_cols, "End-to-end greedy generate (SmolLM2-135M)", key="e2e")],
                 out=args.out)


if __name__ == "__main__":
    main()
