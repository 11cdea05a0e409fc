"""Which layer's sparsity breaks a long-context task, and at which lengths.

`diagnose(sparse, reference, tokenizer, task, lengths)` scores the task per length for the dense
reference, the sparse model, and the sparse model with one layer at a time made dense (that layer's keep
set to its bank size). The per-layer sweep is the expensive part (a full greedy evaluation per layer), so a
cheap screen runs first, for free inside the sparse model's own evaluation: on every prompt's prefill each
sparse FFN measures, per position bucket (tokens [0, 1K), [1K, 2K), [2K, 4K), ...):

- `mass_kept`: the share of the dense |h| (h = silu(x W_gate) * x W_up) on the channels it kept;
- `recall`: the share of the oracle top-k channels of |h| per bank it kept;
- `rel_err`: ||y_dense - y_sparse|| / ||y_dense|| of the FFN output on the same input;
- `kl`: KL(p_dense || p_sparse) of the layer's output contribution read through the LM head (the residual
  stream after the layer with its FFN dense vs sparse, final norm, LM head: a logit lens), on a sample of
  positions per bucket.

Layers are ranked by their worst `kl` over (length, bucket); only the top `sweep` layers (or those given)
are made dense in the sweep, the others count as cleared by the screen. `recovered[layer][length]` =
(score with that layer dense - sparse score) / (dense score - sparse score) where the gap is at least
`min_gap`; the verdict names the layer(s) that recover the most, with the length range.

Works on bank-sparse models through the recipe's public pieces (`sparse_ffns`, each module's `keep`,
`bank_size`, `target_keep`, `layer_idx`, `kept_mask`); the reference may be any dense checkpoint of the
same tokenizer.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from upcycle.eval import tasks as task_lib
from upcycle.kernels.reference import bank_topk_mask
from upcycle.recipes.bank_sparse import BankSparseSwiGLU, sparse_ffns

log = logging.getLogger(__name__)

MIN_GAP = 0.05  # a length whose dense - sparse gap is smaller counts as "no loss" (recovered is undefined there)


# ---------------------------------------------------------------------------------------------- the model
def sparse_layers(model: nn.Module, what: str = "SPARSE") -> dict[int, BankSparseSwiGLU]:
    """{layer index: bank-sparse FFN}; ValueError naming the fix for a dense (or other-recipe) model."""
    found = {m.layer_idx: m for _, m in sparse_ffns(model)}
    if not found:
        from upcycle.recipes import registry

        recipe = registry.for_model(model)
        kind = f"converted with recipe {recipe.name!r}" if recipe is not None else "a dense model"
        raise ValueError(f"{what} is {kind}, not a bank-sparse one: pass a checkpoint from `upcycle convert` "
                         "(bank_sparse) as the sparse model, and the dense one as --reference.")
    return dict(sorted(found.items()))


def check_dense(model: nn.Module, what: str = "--reference") -> None:
    if any(True for _ in sparse_ffns(model)):
        raise ValueError(f"{what} is a bank-sparse model: pass the dense checkpoint (or leave --reference out to "
                         "use the sparse model's own dense form).")


def check_layers(layers: Sequence[int], model: nn.Module, what: str = "--layers") -> list[int]:
    """`layers` validated against the model's bank-sparse layers (ValueError listing the valid ones)."""
    valid = sparse_layers(model)
    bad = [i for i in layers if i not in valid]
    if bad:
        lo, hi = min(valid), max(valid)
        raise ValueError(f"{what}: layer(s) {', '.join(map(str, bad))} out of range: this model's bank-sparse "
                         f"FFN layers are {lo}-{hi}" + ("" if len(valid) == hi - lo + 1 else
                                                        f" ({', '.join(map(str, valid))})") + ".")
    return list(layers)


@contextlib.contextmanager
def dense_layer(model: nn.Module, layer: int | None):
    """Within: `layer`'s FFN runs densely (keep = bank size); None: no change."""
    if layer is None:
        yield
        return
    m = sparse_layers(model)[layer]
    old = m.keep
    m.keep = m.bank_size
    try:
        yield
    finally:
        m.keep = old


def ffn_density(model: nn.Module, keeps: dict[int, int] | None = None) -> float:
    """Whole-model FFN density: kept channels over all FFN channels, dense FFN layers counting 1 (the keeps
    of the live modules, or `keeps` {layer: keep} over them)."""
    from upcycle import hf

    kept = total = 0
    for _, idx, m in hf.glu_modules(model):
        d_ff = m.gate_proj.out_features
        if isinstance(m, BankSparseSwiGLU):
            keep = (keeps or {}).get(idx, m.keep)
            kept += d_ff * min(keep, m.bank_size) / m.bank_size
        else:
            kept += d_ff
        total += d_ff
    return kept / total


# ---------------------------------------------------------------------------------------------- the screen
def buckets_for(length: int) -> list[tuple[int, int]]:
    """Position buckets [0, 1K), [1K, 2K), [2K, 4K), ... covering `length` tokens."""
    edges = [0, 1024]
    while edges[-1] < length:
        edges.append(edges[-1] * 2)
    edges[-1] = max(edges[-1], length)
    return [(a, b) for a, b in zip(edges[:-1], edges[1:], strict=True) if a < length]


class Screen:
    """Hooks on every bank-sparse FFN of `model`: per-layer statistics of every forward of more than one token
    (a prompt's prefill), accumulated per position bucket; `kl_positions` positions per bucket for the KL.

    The hooks sit on the FFN module and the norm before it, never on its linears: a hook there switches the
    decode steps off the fused kernel, and greedy decoding on another summation order can flip near-ties, so
    the screened model would score differently from the model `upcycle eval` runs."""

    def __init__(self, model: nn.Module, kl_positions: int = 32, seed: int = 0):
        self.model = model
        self.ffns = sparse_layers(model)
        self.kl_positions = kl_positions
        self.gen = torch.Generator().manual_seed(seed)
        self.key = "all"  # what the statistics are filed under (diagnose: the task length being scored)
        self.sums: dict[str, dict[int, dict[tuple[int, int], dict[str, float]]]] = {}
        self._hooks: list = []
        self._residual: dict[int, Tensor] = {}
        self.norm, self.head = _final_norm(model), model.get_output_embeddings()
        self._norms = _post_attention_norms(model)

    def __enter__(self) -> Screen:
        for idx, m in self.ffns.items():
            norm = self._norms.get(idx)
            if norm is not None:
                self._hooks.append(norm.register_forward_pre_hook(
                    lambda mod, args, i=idx: self._keep_residual(i, args[0])))
            self._hooks.append(m.register_forward_hook(
                lambda mod, args, out, i=idx: self._measure(i, mod, args[0], out)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _keep_residual(self, i: int, h: Tensor) -> None:
        if h.shape[-2] > 1:
            self._residual[i] = h.detach()

    @torch.no_grad()
    def _measure(self, i: int, m: BankSparseSwiGLU, x: Tensor, y: Tensor) -> None:
        if x.shape[-2] <= 1 or x.shape[0] != 1:  # decode steps (and batches) are not screened
            return
        x, y = x[0].float(), y[0].float()
        resid = self._residual.pop(i, None)
        used = m.kept_mask(x).reshape(x.shape[0], -1)
        h = m.act_fn(m.gate_proj(x)) * m.up_proj(x)
        habs = h.abs()
        oracle = bank_topk_mask(habs, m.bank_size, min(m.target_keep, m.bank_size))
        mass = (habs * used).sum(-1) / habs.sum(-1).clamp_min(1e-30)
        recall = (oracle & used).sum(-1) / oracle.sum(-1).clamp_min(1)
        y_dense = m.down_proj(h)
        diff = (y_dense - y).norm(dim=-1)
        rel = diff / y_dense.norm(dim=-1).clamp_min(1e-30)
        # the change of the residual stream after this layer, relative to its size
        resid_rel = diff / (resid[0].float() + y_dense).norm(dim=-1).clamp_min(1e-30) if resid is not None else rel
        by_layer = self.sums.setdefault(self.key, {}).setdefault(i, {})
        for lo, hi in buckets_for(x.shape[0]):
            sl = slice(lo, min(hi, x.shape[0]))
            acc = by_layer.setdefault((lo, hi), {"n": 0, "mass_kept": 0.0, "recall": 0.0, "rel_err": 0.0,
                                                 "resid_rel": 0.0, "kl_n": 0, "kl": 0.0})
            acc["n"] += sl.stop - sl.start
            acc["mass_kept"] += float(mass[sl].sum())
            acc["recall"] += float(recall[sl].sum())
            acc["rel_err"] += float(rel[sl].sum())
            acc["resid_rel"] += float(resid_rel[sl].sum())
            if resid is not None and self.head is not None and self.kl_positions:
                n = sl.stop - sl.start
                pick = torch.randperm(n, generator=self.gen)[: self.kl_positions] + sl.start
                kl = _lens_kl(self.norm, self.head, resid[0].float()[pick], y_dense[pick], y[pick])
                acc["kl_n"] += len(pick)
                acc["kl"] += float(kl.sum())

    def summary(self) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
        """{key: {layer: {"lo-hi": {"tokens", "mass_kept", "recall", "rel_err", "kl"}}}} (means per token)."""
        out: dict = {}
        for key, layers in self.sums.items():
            out[key] = {}
            for i, by_bucket in sorted(layers.items()):
                out[key][str(i)] = {}
                for (lo, hi), a in sorted(by_bucket.items()):
                    n = max(a["n"], 1)
                    out[key][str(i)][f"{lo}-{hi}"] = {
                        "tokens": a["n"], "mass_kept": a["mass_kept"] / n, "recall": a["recall"] / n,
                        "rel_err": a["rel_err"] / n, "resid_rel": a["resid_rel"] / n,
                        "kl": a["kl"] / a["kl_n"] if a["kl_n"] else None}
        return out


def _lens_kl(norm: nn.Module | None, head: nn.Module, resid: Tensor, y_dense: Tensor, y_sparse: Tensor) -> Tensor:
    """KL(p_dense || p_sparse) per position of softmax(head(norm(resid + y))) (in the head's dtype, as float)."""
    dtype = head.weight.dtype
    r = torch.cat([resid + y_dense, resid + y_sparse]).to(dtype)
    logits = head(norm(r) if norm is not None else r).float()
    lp = F.log_softmax(logits, dim=-1)
    lp_d, lp_s = lp.chunk(2)
    return (lp_d.exp() * (lp_d - lp_s)).sum(-1).clamp_min(0)


def _final_norm(model: nn.Module) -> nn.Module | None:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    return getattr(decoder, "norm", None)


def _post_attention_norms(model: nn.Module) -> dict[int, nn.Module]:
    """{layer: the norm whose input is the residual stream right before the FFN} (Llama/Qwen/Mistral naming)."""
    from upcycle import hf

    out = {}
    for i, layer in enumerate(hf.decoder_layers(model)):
        norm = getattr(layer, "post_attention_layernorm", None)
        if norm is not None:
            out[i] = norm
    return out


RANK_BY = ("kl", "resid_rel", "rel_err", "mass_lost")


def screen_ranking(screen: dict, lengths: Sequence[int], rank_by: str = "kl") -> list[tuple[int, float]]:
    """(layer, its worst value over `lengths` and position buckets) from the highest. `rank_by`: "kl" (the logit
    lens KL; layers without one fall back to "resid_rel"), "resid_rel" (the residual stream's relative change),
    "rel_err" (the FFN output's relative error) or "mass_lost" (1 - |h| mass kept)."""
    if rank_by not in RANK_BY:
        raise ValueError(f"--rank-by {rank_by!r} is not one of {', '.join(RANK_BY)}.")

    def value(b: dict, key: str):
        return 1 - b["mass_kept"] if key == "mass_lost" else b.get(key)

    rows = []
    for layer, per_length in screen.items():
        buckets = [b for n in lengths for b in per_length.get(str(n), {}).values()]
        vals = [v for b in buckets if (v := value(b, rank_by)) is not None]
        if not vals and rank_by == "kl":
            vals = [v for b in buckets if (v := value(b, "resid_rel")) is not None]
        rows.append((int(layer), max(vals) if vals else 0.0))
    return sorted(rows, key=lambda r: -r[1])


# ---------------------------------------------------------------------------------------------- scoring
def score_lengths(model: nn.Module, tokenizer, samples: dict[int, list], label: str = "",
                  progress: Callable[[str], None] | None = None, screen: Screen | None = None) -> dict[int, dict]:
    """{length: {"score", "ruler_score", "exact_match", "n", "sample_scores", "predictions", "seconds"}}
    (`screen`: files its statistics under each length)."""
    gen = task_lib.hf_generate_fn(model, tokenizer)
    out = {}
    for length, batch in samples.items():
        if screen is not None:
            screen.key = str(length)
        preds: list[str] = []
        t0 = time.perf_counter()
        r = task_lib.evaluate(gen, batch, on_result=lambda s, p, v, preds=preds: preds.append(p[:300]))
        r["predictions"], r["seconds"] = preds, time.perf_counter() - t0
        out[length] = r
        if progress:
            progress(f"{label:<18} {length:>6}: score {r['score']:.3f} ({r['n']} samples, {r['seconds']:.0f} s)")
    return out


def recovered(dense: float, sparse: float, repaired: float, min_gap: float = MIN_GAP) -> float | None:
    """Share of the dense-sparse gap a variant closes (None where the gap is under min_gap)."""
    gap = dense - sparse
    if gap < min_gap:
        return None
    return (repaired - sparse) / gap


# ---------------------------------------------------------------------------------------------- the diagnosis
def diagnose(
    sparse: nn.Module,
    reference: nn.Module,
    tokenizer,
    task: str = "cwe",
    lengths: Sequence[int] = (1024, 2048, 4096, 8192),
    samples: int = 3,
    seed: int = task_lib.DEFAULT_SEED,
    haystack: str | None = None,
    sweep: int | None = 3,
    layers: Sequence[int] | None = None,
    kl_positions: int = 32,
    min_gap: float = MIN_GAP,
    progress: Callable[[str], None] | None = None,
    on_update: Callable[[dict], None] | None = None,
    rank_by: str = "kl",
) -> dict:
    """The diagnosis as a JSON-ready dict (see the module docstring). `sweep`: how many layers the full sweep
    makes dense, the screen's worst first (None: every layer); `layers`: sweep exactly these. The sweep runs
    only at the lengths that lose at least `min_gap` (elsewhere nothing is lost, so nothing can be recovered);
    the screen ranks layers by `rank_by` at those lengths."""
    ffns = sparse_layers(sparse)
    check_dense(reference)
    if layers is not None:
        layers = check_layers(layers, sparse)
    task_lib.resolve(task)
    screen_ranking({}, [], rank_by)  # checks rank_by before any work
    lengths = sorted(set(lengths))
    task_lib.check_lengths(sparse, lengths)
    task_lib.check_lengths(reference, lengths, "--lengths (reference)")
    say = progress or (lambda s: log.info("%s", s))
    t_start = time.perf_counter()
    batches = {n: task_lib.generate(task, tokenizer, n, samples, seed, haystack) for n in lengths}
    result: dict = {
        "task": task, "lengths": lengths, "samples": samples, "seed": seed, "min_gap": min_gap,
        "sparse_layers": list(ffns), "keep": {str(i): m.keep for i, m in ffns.items()},
        "bank_size": next(iter(ffns.values())).bank_size, "ffn_density": ffn_density(sparse),
        "prompt_tokens": {str(n): sum(s.prompt_tokens for s in b) / len(b) for n, b in batches.items()},
    }

    def update(**kw):
        result.update(kw)
        if on_update:
            on_update(result)

    dense_scores = score_lengths(reference, tokenizer, batches, "dense reference", say)
    update(dense={str(n): r for n, r in dense_scores.items()})
    with Screen(sparse, kl_positions, seed) as screen:  # the screen rides along the sparse model's own prefills
        sparse_scores = score_lengths(sparse, tokenizer, batches, "sparse", say, screen)
    by_length = screen.summary()
    screen_layers = {str(layer): {str(n): by_length.get(str(n), {}).get(str(layer), {}) for n in lengths}
                     for layer in ffns}
    gaps = {n: dense_scores[n]["score"] - sparse_scores[n]["score"] for n in lengths}
    lost = [n for n in lengths if gaps[n] >= min_gap]
    ranking = screen_ranking(screen_layers, lost or lengths, rank_by)
    update(sparse={str(n): r for n, r in sparse_scores.items()}, screen=screen_layers, rank_by=rank_by,
           screen_ranking=[{"layer": i, "worst": v, "over_lengths": lost or lengths} for i, v in ranking])
    if layers is not None:
        swept = list(layers)
    elif sweep is None:
        swept = list(ffns)
    else:
        swept = [i for i, _ in ranking[: max(0, sweep)]]
    skipped_reason = None
    if layers is None and all(g < min_gap for g in gaps.values()):
        skipped_reason = (f"no length loses {min_gap} or more of the dense score: nothing to recover, the per-layer "
                          "sweep is skipped (pass --layers to run it anyway)")
        swept = []
        say(skipped_reason)
    update(swept=swept, cleared_by_screen=[i for i in ffns if i not in swept], sweep_skipped=skipped_reason,
           layers={})
    sweep_lengths = lost or lengths  # with --layers and no loss anywhere: every length
    update(sweep_lengths=sweep_lengths)
    for layer in swept:
        with dense_layer(sparse, layer):
            scores = score_lengths(sparse, tokenizer, {n: batches[n] for n in sweep_lengths}, f"layer {layer} dense",
                                   say)
        entry = {"scores": {str(n): scores[n]["score"] if n in scores else None for n in lengths},
                 "recovered": {str(n): recovered(dense_scores[n]["score"], sparse_scores[n]["score"],
                                                 scores[n]["score"], min_gap) if n in scores else None
                               for n in lengths},
                 "details": {str(n): r for n, r in scores.items()},
                 "ffn_density": ffn_density(sparse, {layer: ffns[layer].bank_size})}
        result["layers"][str(layer)] = entry
        update()
    result["best_layers"] = best_layers(result)
    result["best_layer"] = result["best_layers"][0]["layer"] if result["best_layers"] else None
    result["verdict"] = verdict(result)
    result["seconds"] = time.perf_counter() - t_start
    update()
    return result


def lost_lengths(r: dict) -> list[int]:
    return [n for n in r["lengths"] if r["dense"][str(n)]["score"] - r["sparse"][str(n)]["score"] >= r["min_gap"]]


def best_layers(r: dict) -> list[dict]:
    """Swept layers by the mean share of the lost score they recover (over the lengths that lose), best first;
    each {"layer", "recovered", "lengths" (where it recovers at least half)}."""
    lost = lost_lengths(r)
    rows = []
    for layer, e in r.get("layers", {}).items():
        rec = [e["recovered"][str(n)] for n in lost if e["recovered"][str(n)] is not None]
        if rec:
            rows.append({"layer": int(layer), "recovered": sum(rec) / len(rec),
                         "lengths": [n for n in lost if (e["recovered"][str(n)] or 0) >= 0.5]})
    return sorted(rows, key=lambda row: -row["recovered"])


def verdict(r: dict) -> str:
    """One paragraph naming the layer(s) whose densification recovers the most, with the length range."""
    lengths = r["lengths"]
    dense = {n: r["dense"][str(n)]["score"] for n in lengths}
    sparse = {n: r["sparse"][str(n)]["score"] for n in lengths}
    lost = [n for n in lengths if dense[n] - sparse[n] >= r["min_gap"]]
    head = f"{r['task']}: dense " + ", ".join(f"{dense[n]:.2f}" for n in lengths) + "; sparse " + ", ".join(
        f"{sparse[n]:.2f}" for n in lengths) + f" at {', '.join(map(str, lengths))} tokens."
    if max(dense.values()) < 0.5:
        head += (" The dense reference scores below 0.5 at every length: the task is beyond this model, so the "
                 "diagnosis says little.")
    if not lost:
        return head + f" Sparsity costs less than {r['min_gap']} at every length: no layer to repair."
    if not r.get("layers"):
        return head + f" Lost at {_span(lost)}; no layer was swept."
    best = []
    for layer, e in r["layers"].items():
        rec = [e["recovered"][str(n)] for n in lost if e["recovered"][str(n)] is not None]
        best.append((sum(rec) / len(rec) if rec else -math.inf, int(layer), e))
    best.sort(key=lambda b: -b[0])
    mean, layer, e = best[0]
    good = [n for n in lost if (e["recovered"][str(n)] or 0) >= 0.5]
    where = _span(good) if good else _span(lost)
    text = (f"{head} Lost at {_span(lost)}. Layer {layer} is the worst: made dense it recovers "
            f"{mean:.0%} of the lost score on average over those lengths (" + ", ".join(
                f"{n}: {e['scores'][str(n)]:.2f} of {dense[n]:.2f}" for n in lost) + ")")
    text += f", at least half of it at {where}." if good else f"; less than half at every length ({where})."
    others = [(m, i) for m, i, _ in best[1:] if m >= 0.5]
    if others:
        text += " Also above half: " + ", ".join(f"layer {i} ({m:.0%})" for m, i in others) + "."
    if mean < 0.5:
        text += " No single layer recovers half the gap: the loss is spread over layers."
    return text


def _span(lengths: Sequence[int]) -> str:
    lengths = sorted(lengths)
    return f"{lengths[0]}" if len(lengths) == 1 else f"{lengths[0]}-{lengths[-1]} tokens"


# ---------------------------------------------------------------------------------------------- reports
def format_table(r: dict) -> str:
    lengths = r["lengths"]
    w = max(8, *(len(str(n)) + 2 for n in lengths))
    lines = [f"task {r['task']}, {r['samples']} samples per length, seed {r['seed']} "
             f"(score: RULER string_match_all in [0, 1]; recovered: share of the dense-sparse gap closed)", ""]
    lines.append(f"{'model':<22}" + "".join(f"{n:>{w}}" for n in lengths) + f"{'FFN density':>13}")
    lines.append(f"{'dense reference':<22}" + "".join(f"{r['dense'][str(n)]['score']:>{w}.3f}" for n in lengths)
                 + f"{1.0:>13.4f}")
    lines.append(f"{'sparse':<22}" + "".join(f"{r['sparse'][str(n)]['score']:>{w}.3f}" for n in lengths)
                 + f"{r['ffn_density']:>13.4f}")
    for layer, e in r.get("layers", {}).items():
        lines.append(f"{'layer ' + layer + ' dense':<22}" + "".join(
            f"{'-' if e['scores'][str(n)] is None else format(e['scores'][str(n)], '.3f'):>{w}}" for n in lengths)
            + f"{e['ffn_density']:>13.4f}")
        lines.append(f"{'  recovered':<22}" + "".join(
            f"{'-' if e['recovered'][str(n)] is None else format(e['recovered'][str(n)], '.0%'):>{w}}"
            for n in lengths))
    over = r["screen_ranking"][0]["over_lengths"] if r["screen_ranking"] else lengths
    lines += ["", f"screen at {', '.join(map(str, over))} tokens, worst position bucket (ranked by "
              f"{r.get('rank_by', 'kl')}; KL: the layer's output contribution through the LM head; resid: its relative "
              "change of the residual stream):",
              f"{'layer':>6}{'KL':>10}{'resid':>8}{'|h| kept':>10}{'recall':>8}{'rel err':>9}  swept"]
    swept = set(r.get("swept", []))
    for row in r["screen_ranking"]:
        i = row["layer"]
        per = r["screen"][str(i)]
        buckets = [b for n in over for b in per.get(str(n), {}).values()]
        kl = max((b["kl"] for b in buckets if b.get("kl") is not None), default=float("nan"))
        res = max((b.get("resid_rel", float("nan")) for b in buckets), default=float("nan"))
        mass = min((b["mass_kept"] for b in buckets), default=float("nan"))
        rec = min((b["recall"] for b in buckets), default=float("nan"))
        err = max((b["rel_err"] for b in buckets), default=float("nan"))
        lines.append(f"{i:>6}{kl:>10.4g}{res:>8.3f}{mass:>10.3f}{rec:>8.3f}{err:>9.3f}  "
                     f"{'yes' if i in swept else 'cleared'}")
    lines += ["", "verdict: " + r["verdict"]]
    return "\n".join(lines)


def heatmap(r: dict, path) -> bool:
    """DIR/heatmap.png: score recovered per (layer, length) for the swept layers, beside the screen's KL for
    every layer; False (and a warning) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no heatmap (pip install matplotlib)")
        return False
    import numpy as np

    lengths = r["lengths"]
    layers = [int(i) for i in r["sparse_layers"]]
    rec = np.full((len(layers), len(lengths)), np.nan)
    kl = np.full((len(layers), len(lengths)), np.nan)
    for a, layer in enumerate(layers):
        e = r.get("layers", {}).get(str(layer))
        for b, n in enumerate(lengths):
            if e is not None and e["recovered"][str(n)] is not None:
                rec[a, b] = e["recovered"][str(n)]
            buckets = r["screen"].get(str(layer), {}).get(str(n), {}).values()
            vals = [v["kl"] for v in buckets if v.get("kl") is not None]
            if vals:
                kl[a, b] = max(vals)
    fig, axes = plt.subplots(1, 2, figsize=(9, max(3.5, 0.22 * len(layers) + 1.8)), sharey=True)
    gaps = ", ".join(f"{n}: {r['dense'][str(n)]['score'] - r['sparse'][str(n)]['score']:+.2f}" for n in lengths)
    fig.suptitle(f"{r['task']}: score recovered by making one layer dense (gap dense - sparse: {gaps})", fontsize=9)
    cmap = plt.get_cmap("viridis").with_extremes(bad="#dddddd")
    im = axes[0].imshow(np.ma.masked_invalid(rec), aspect="auto", cmap=cmap, vmin=min(0.0, np.nanmin(rec) if
                        np.isfinite(rec).any() else 0.0), vmax=max(1.0, np.nanmax(rec) if np.isfinite(rec).any()
                                                                   else 1.0), origin="lower")
    axes[0].set_title("score recovered (grey: cleared by the screen or no gap)", fontsize=8)
    fig.colorbar(im, ax=axes[0], label="fraction of the lost score recovered")
    im2 = axes[1].imshow(np.ma.masked_invalid(kl), aspect="auto", cmap="magma", origin="lower")
    axes[1].set_title("screen: worst KL of the layer's output (logit lens)", fontsize=8)
    fig.colorbar(im2, ax=axes[1], label="KL(dense || sparse), nats")
    for ax in axes:
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_xlabel("sequence length (tokens)")
    axes[0].set_yticks(range(len(layers)), [str(i) for i in layers], fontsize=6 if len(layers) > 20 else 8)
    axes[0].set_ylabel("decoder layer made dense")
    for a in range(len(layers)):
        for b in range(len(lengths)):
            if np.isfinite(rec[a, b]):
                axes[0].text(b, a, f"{rec[a, b]:.0%}", ha="center", va="center", fontsize=6,
                             color="white" if rec[a, b] < 0.5 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return True
