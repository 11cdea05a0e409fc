"""`evaluate(...)`: what `upcycle eval` runs, as one library call returning a JSON-ready dict."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from upcycle import hf
from upcycle.data import load_tokenizer, read_text, tokenize
from upcycle.eval.perplexity import check_positions, perplexity
from upcycle.eval.stats import stats_for
from upcycle.eval.tasks import run as run_tasks
from upcycle.recipes import registry

log = logging.getLogger(__name__)

PathLike = str | os.PathLike


def describe(model: nn.Module) -> dict:
    """The sparsity layout of `model`, as its recipe describes it (a dense model: its FFN layers)."""
    recipe = registry.for_model(model)
    if recipe is not None and recipe.describe is not None:
        return {"recipe": recipe.name, **recipe.describe(model)}
    baseline = getattr(model, "upcycle_baseline", None)
    if recipe is None and baseline is not None:  # a baseline applied to a model converted on the fly
        owner = registry.baselines().get(baseline)
        if owner is not None and owner[0].describe is not None:
            return {"recipe": owner[0].name, **owner[0].describe(model)}
    ffns = hf.glu_modules(model)
    return {"recipe": None, "kind": "dense", "ffn_layers": len(ffns), "sparse_layers": 0, "bank_size": None,
            "keep": {}, "baseline": baseline}


def _calibration_ids(paths: Sequence[PathLike], tokenizer, n_tokens: int, seq_len: int) -> torch.Tensor:
    ids = tokenize(tokenizer, read_text(paths))
    rows = min(n_tokens, len(ids)) // seq_len
    if rows < 1:
        raise ValueError(f"calibration text has {len(ids)} tokens: need at least one window of {seq_len}.")
    return ids[: rows * seq_len].reshape(rows, seq_len)


def _weighted(results: list[dict], key: str) -> float | None:
    pairs = [(r[key], r["tokens"]) for r in results if r.get(key) is not None and r.get("tokens")]
    total = sum(t for _, t in pairs)
    return sum(v * t for v, t in pairs) / total if total else None


def evaluate(
    model: PathLike | nn.Module,
    data: PathLike | Sequence[PathLike] | None = None,
    seq_len: int = 512,
    stride: int | None = None,
    max_windows: int | None = None,
    batch_size: int = 1,
    reference: PathLike | nn.Module | None = None,
    baseline: str | None = None,
    keep: int = 16,
    bank_size: int = 64,
    calib_data: PathLike | Sequence[PathLike] | None = None,
    calib_tokens: int = 16384,
    calib_steps: int | None = None,
    tasks: Sequence[str] | None = None,
    lengths: Sequence[int] = (1024, 2048, 4096),
    samples: int = 5,
    seed: int = 42,
    haystack: PathLike | Sequence[PathLike] | None = None,
    tokenizer=None,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    rope_scaling: dict | None = None,
    max_position_embeddings: int | None = None,
    progress: bool = False,
) -> dict:
    """Perplexity (`data`) and/or long-context tasks (`tasks`) of `model`, with per-layer FFN statistics.

    `model`/`reference`: checkpoint directories (loaded with `upcycle.load`) or loaded models; with a
    model object pass `tokenizer` (an object or a path). `baseline` applies a post-hoc recipe first
    (any recipe's, by name: `upcycle.eval.BASELINES`; the calibrated ones need `calib_data`). Returns a JSON-ready dict
    with at least "ppl" (None without `data`) and "ffn_density". `rope_scaling` / `max_position_embeddings`
    extend the model's positions (and the reference's) for long tasks. `progress`: bars over the windows and the
    task samples (`upcycle eval` shows them); warnings about the settings come first, before any of the work.
    """
    import upcycle

    task_names = tasks
    if data is None and not task_names:
        raise ValueError("nothing to evaluate: pass data (text files) and/or tasks.")
    name = str(model) if isinstance(model, (str, os.PathLike)) else type(model).__name__
    if isinstance(model, (str, os.PathLike)):
        path = model
        model = upcycle.load(path, dtype=dtype, device=device)  # first: a bad checkpoint gets its own message
        tok = tokenizer if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)) else None
        tok = tok or load_tokenizer(path, tokenizer)
    else:
        if tokenizer is None:
            raise ValueError("a model object needs its tokenizer: pass tokenizer= (an object or a path).")
        tok = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer
    hf.set_rope(model, None, rope_scaling, max_position_embeddings)
    # the settings' checks and warnings first: not minutes later, after the work, under the table
    if data is not None:
        check_positions(model, seq_len)
    if task_names:
        from upcycle.eval.tasks import check_lengths

        check_lengths(model, lengths)
    if baseline:
        recipe, canon = resolve_baseline(baseline)
        calib = None
        if canon in recipe.baselines_need_calibration:
            if not calib_data:
                raise ValueError(
                    f"baseline {canon!r} needs calibration text: pass --calib-data PATH (text disjoint from --data)."
                )
            if data is not None and {Path(p).resolve() for p in _list(calib_data)} & {
                Path(p).resolve() for p in _list(data)
            }:
                log.warning("calibration and evaluation text overlap: the baseline is calibrated on its test data")
            calib = _calibration_ids(_list(calib_data), tok, calib_tokens, seq_len)
        options = {"bank_size": bank_size, "keep": keep, "calib_steps": calib_steps}
        recipe.apply_baseline(model, canon, options, calib, progress=progress)
    ref_name = None
    if isinstance(reference, (str, os.PathLike)):
        ref_name = str(reference)
        reference = upcycle.load(reference, dtype=dtype, device=device)
        hf.set_rope(reference, None, rope_scaling, max_position_embeddings)
    elif reference is not None:
        ref_name = type(reference).__name__

    out: dict = {"model": name, "sparsity": describe(model), "ppl": None, "ffn_density": None}
    if data is not None:
        files = _list(data)
        ids = tokenize(tok, read_text(files))
        with stats_for(model) as st:
            ppl = perplexity(model, ids, seq_len, stride, max_windows, batch_size, reference, progress, warn=False)
        stats = st.summary()
        out.update(ppl=ppl["ppl"], ffn_density=stats["ffn_density"], kl_ref=ppl.get("kl_ref"))
        out["perplexity"] = {**ppl, "data": [str(p) for p in files], "tokenization": "whole text, default specials"}
        out["reference"] = ref_name
        out["stats"] = stats
    if task_names:
        hay = read_text(_list(haystack)) if haystack else None
        res = run_tasks(model, tok, task_names, lengths, n=samples, seed=seed, haystack=hay, progress=progress)
        out["tasks"] = {t: {str(n): r for n, r in by_len.items()} for t, by_len in res.items()}
        if data is None:
            out["ffn_density"] = _weighted([r for by_len in res.values() for r in by_len.values()], "ffn_density")
        out["task_config"] = {"lengths": list(lengths), "samples": samples, "seed": seed,
                              "haystack": [str(p) for p in _list(haystack)] if haystack else None,
                              "generator": "RULER (upcycle.eval.ruler)", "rope_scaling": rope_scaling}
    return out


def resolve_baseline(name: str):
    """(recipe, canonical name) of a baseline; ValueError listing every recipe's baselines."""
    known = registry.baselines()
    for recipe in registry.load_all():  # aliases are each recipe's own
        name = recipe.baseline_aliases.get(name, name)
    if name not in known:
        raise ValueError(f"unknown baseline {name!r}: choose one of {', '.join(known)}.")
    return known[name][0], name


def _list(paths) -> list:
    return [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
