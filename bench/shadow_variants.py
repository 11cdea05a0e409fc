"""Which low-bit scorer of gate/up ranks SwiGLU channels best at a given predictor budget? (issue 18)

On SmolLM2-135M-Instruct (the dense parent, untrained for sparsity), every FFN's inputs on held-out text
(WikiText-2's last 15%) are scored by variants of the shadow predictor, and each variant's recall of the
oracle top-16-of-64 (by the true |h|) is measured per layer. Variants at the default budget (0.10): the
default 2-bit shadow (groups of 96, clipping search); the same after activation-aware column scaling
(quantise W diag(s), score with x / s, s_i = E[x_i^2]^(alpha/2) on the training text, AWQ's idea); a
4-bit shadow of only the half of the inputs with the most energy E[x_i^2] (|G_:i|^2 + |U_:i|^2). Below it:
1-bit shadows (two levels per group; 0.044 at groups of 576: what would fit budget 0.05, where `auto` falls
back to a low-rank predictor; the decode kernels pack 2, 4 or 8 bits, not 1). Above it, for reference:
3 bits (0.127), 4 bits (the budget-0.2 shadow), 8 bits (the ceiling row), and two-stage scoring (the 2-bit
shadow's top 20 or 24 per bank re-ranked by their exact |h|, whose extra gate/up rows count as bytes).

    python bench/shadow_variants.py [--tokens 512]

Writes bench/results/shadow_variants.json and .md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from common import RESULTS, machine_record, write_result
from real_model import dense_dir
from routing import split

import upcycle
from upcycle.kernels.reference import bank_topk_mask
from upcycle.recipes.bank_sparse.predictors import fake_quantize, shadow_bytes_fraction

BANK, KEEP = 64, 16


def layer_inputs(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """Every decoder layer's FFN input [tokens, d] on `ids`."""
    store: dict[int, torch.Tensor] = {}
    layers = model.model.layers
    hooks = [layers[i].mlp.register_forward_pre_hook(
        lambda m, a, i=i: store.__setitem__(i, a[0].reshape(-1, a[0].shape[-1]).detach()))
        for i in range(len(layers))]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return [store[i] for i in range(len(layers))]


def variants(G: torch.Tensor, U: torch.Tensor, x_calib: torch.Tensor):
    """(name, bytes fraction, scorer x -> |h_q|) of every variant for one FFN's gate G and up U [d_ff, d]."""
    def shadow(gq, uq, cols=None, scale=None):
        def score(x):
            x = x if cols is None else x[:, cols]
            x = x if scale is None else x / scale
            return (F.silu(x @ gq.T) * (x @ uq.T)).abs()
        return score

    def plain(bits, group):
        return shadow(fake_quantize(G, bits, group), fake_quantize(U, bits, group))

    out = [("2-bit, groups of 96 (the default)", shadow_bytes_fraction(2, 96), plain(2, 96))]
    energy = x_calib.pow(2).mean(0).clamp_min(1e-12)
    for alpha in (0.25, 0.5):
        s = energy.pow(alpha / 2)
        s = s / s.mean()
        out.append((f"2-bit, groups of 96, activation-aware scaling alpha={alpha}", shadow_bytes_fraction(2, 96),
                    shadow(fake_quantize(G * s, 2, 96), fake_quantize(U * s, 2, 96), scale=s)))
    importance = energy * (G.pow(2).sum(0) + U.pow(2).sum(0))
    cols = importance.topk(G.shape[1] // 2).indices.sort().values
    half = G.shape[1] // 2
    group = 96 if half % 96 == 0 else 32
    out.append((f"4-bit on the {half} highest-energy inputs of {G.shape[1]}", shadow_bytes_fraction(4, group) / 2,
                shadow(fake_quantize(G[:, cols].contiguous(), 4, group),
                       fake_quantize(U[:, cols].contiguous(), 4, group), cols=cols)))
    out += [("1-bit, groups of 96", shadow_bytes_fraction(1, 96), plain(1, 96)),
            ("1-bit, groups of 576", shadow_bytes_fraction(1, 576), plain(1, 576)),
            ("3-bit, groups of 576", shadow_bytes_fraction(3, 576), plain(3, 576)),
            ("4-bit, groups of 64 (budget 0.2)", shadow_bytes_fraction(4, 64), plain(4, 64)),
            ("8-bit, groups of 576 (the ceiling row)", shadow_bytes_fraction(8, 576), plain(8, 576))]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=str(Path.home() / ".cache/upcycle/real_model"))
    ap.add_argument("--tokens", type=int, default=512, help="held-out (and calibration) tokens (%(default)s)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    work = Path(args.work)
    base = dense_dir(work)
    model, tok = upcycle.io.load_pretrained(base)
    model.eval()
    train_dir, held = split(work, "wikitext2")
    train_text = next(train_dir.glob("*.txt")).read_text(encoding="utf-8")
    ids = {k: tok(t[:args.tokens * 8], return_tensors="pt").input_ids[:, :args.tokens]
           for k, t in (("held", held["in"]), ("calib", train_text))}
    xs_held, xs_calib = layer_inputs(model, ids["held"]), layer_inputs(model, ids["calib"])
    recalls: dict[str, list[float]] = {}
    fractions: dict[str, float] = {}
    for layer, (x, xc) in enumerate(zip(xs_held, xs_calib, strict=True)):
        mlp = model.model.layers[layer].mlp
        G, U = mlp.gate_proj.weight.data.float(), mlp.up_proj.weight.data.float()
        h = (F.silu(x @ G.T) * (x @ U.T)).abs()
        oracle = bank_topk_mask(h, BANK, KEEP)
        with torch.no_grad():
            scorers = variants(G, U, xc)
            for name, frac, score in scorers:
                kept = bank_topk_mask(score(x), BANK, KEEP)
                recalls.setdefault(name, []).append(((kept & oracle).sum() / oracle.sum()).item())
                fractions[name] = frac
            # two stages: the 2-bit shadow's top `c` per bank, then the exact |h| of those (their true gate/up
            # rows, read on top of the kept ones' for the c - 16 extra) picks the 16
            hq = scorers[0][2](x)  # the default 2-bit shadow's scores
            for c in (20, 24):
                cand = bank_topk_mask(hq, BANK, c)
                kept = bank_topk_mask(torch.where(cand, h, torch.full_like(h, -1.0)), BANK, KEEP)
                name = f"2-bit shadow's top {c}, then the exact |h| of those"
                recalls.setdefault(name, []).append(((kept & oracle).sum() / oracle.sum()).item())
                fractions[name] = shadow_bytes_fraction(2, 96) + (c - KEEP) / BANK * 2 / 3
        print(f"layer {layer}: " + ", ".join(f"{v[-1]:.3f}" for v in recalls.values()), flush=True)
    rows = [{"method": k, "predictor_bytes": fractions[k], "recall_mean": sum(v) / len(v), "recall_min": min(v),
             "recall_max": max(v), "recall_per_layer": v} for k, v in recalls.items()]
    columns = [("method", "method"), ("predictor bytes / dense FFN", "predictor_bytes", ".3f"),
               ("recall (mean over layers)", "recall_mean", ".3f"), ("worst layer", "recall_min", ".3f"),
               ("best layer", "recall_max", ".3f")]
    notes = [f"SmolLM2-135M-Instruct, the dense parent (fp32); {args.tokens} held-out tokens of WikiText-2's last "
             f"15% (recall) and {args.tokens} of its first 85% (the activation statistics); {len(xs_held)} layers. "
             "recall: share of the oracle top-16-of-64 (by the true |h|) the variant keeps. predictor bytes: what "
             "the scorer reads per token over the dense FFN's 16-bit bytes (the per-input scales of the "
             "activation-aware rows, d floats per layer, are left out: < 0.001)."]
    write_result("shadow_variants", {"machine": machine_record("cpu", script=__file__)}, rows, columns,
                 "Shadow predictor variants: recall of the oracle top-16-of-64 at equal and higher predictor bytes",
                 notes, out=args.out)
    print((Path(args.out) / "shadow_variants.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
