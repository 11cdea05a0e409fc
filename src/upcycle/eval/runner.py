"""`evaluate(...)`: what `upcycle eval` runs, as one library call returning a JSON-ready dict."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from upcycle.config import BankSparseConfig
from upcycle.eval import baselines
from upcycle.eval.perplexity import load_tokenizer, perplexity, read_text, tokenize
from upcycle.eval.stats import FFNStats, swiglu_ffns
from upcycle.eval.tasks import run as run_tasks
from upcycle.modules import BankSparseSwiGLU

log = logging.getLogger(__name__)

PathLike = str | os.PathLike


def describe(model: nn.Module) -> dict:
    """The sparsity layout of `model`: FFN layers, converted ones, bank size and keep per layer."""
    ffns = swiglu_ffns(model)
    sparse = [(i, m) for _, i, m in ffns if isinstance(m, BankSparseSwiGLU)]
    return {
        "kind": "bank-sparse" if sparse else "dense",
        "ffn_layers": len(ffns),
        "sparse_layers": len(sparse),
        "bank_size": sparse[0][1].bank_size if sparse else None,
        "keep": {str(i): m.keep for i, m in sparse},
        "baseline": getattr(model, "upcycle_baseline", None),
    }


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
    calib_steps: int = 300,
    tasks: Sequence[str] | None = None,
    lengths: Sequence[int] = (1024, 2048, 4096),
    samples: int = 5,
    seed: int = 0,
    haystack: PathLike | Sequence[PathLike] | None = None,
    tokenizer=None,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> dict:
    """Perplexity (`data`) and/or long-context tasks (`tasks`) of `model`, with per-layer FFN statistics.

    `model`/`reference`: checkpoint directories (loaded with `upcycle.load`) or loaded models; with a
    model object pass `tokenizer` (an object or a path). `baseline` applies a post-hoc recipe first
    (see `upcycle.eval.baselines`; the calibrated ones need `calib_data`). Returns a JSON-ready dict
    with at least "ppl" (None without `data`) and "ffn_density".
    """
    import upcycle

    task_names = tasks
    if data is None and not task_names:
        raise ValueError("nothing to evaluate: pass data (text files) and/or tasks.")
    name = str(model) if isinstance(model, (str, os.PathLike)) else type(model).__name__
    if isinstance(model, (str, os.PathLike)):
        tok = tokenizer if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)) else None
        tok = tok or load_tokenizer(model, tokenizer)
        model = upcycle.load(model, dtype=dtype, device=device)
    else:
        if tokenizer is None:
            raise ValueError("a model object needs its tokenizer: pass tokenizer= (an object or a path).")
        tok = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer
    if baseline:
        canon = baselines.resolve(baseline)
        calib = None
        if canon in baselines.NEEDS_CALIBRATION:
            if not calib_data:
                raise ValueError(
                    f"baseline {canon!r} needs calibration text: pass --calib-data PATH (text disjoint from --data)."
                )
            if data is not None and {Path(p).resolve() for p in _list(calib_data)} & {
                Path(p).resolve() for p in _list(data)
            }:
                log.warning("calibration and evaluation text overlap: the baseline is calibrated on its test data")
            calib = _calibration_ids(_list(calib_data), tok, calib_tokens, seq_len)
        cfg = BankSparseConfig(bank_size=bank_size, keep=keep, calibrate_steps=calib_steps)
        baselines.apply(model, canon, cfg, calib)
    ref_name = None
    if isinstance(reference, (str, os.PathLike)):
        ref_name = str(reference)
        reference = upcycle.load(reference, dtype=dtype, device=device)
    elif reference is not None:
        ref_name = type(reference).__name__

    out: dict = {"model": name, "sparsity": describe(model), "ppl": None, "ffn_density": None}
    if data is not None:
        files = _list(data)
        ids = tokenize(tok, read_text(files))
        with FFNStats(model) as st:
            ppl = perplexity(model, ids, seq_len, stride, max_windows, batch_size, reference)
        stats = st.summary()
        out.update(ppl=ppl["ppl"], ffn_density=stats["ffn_density"], kl_ref=ppl.get("kl_ref"))
        out["perplexity"] = {**ppl, "data": [str(p) for p in files], "tokenization": "whole text, default specials"}
        out["reference"] = ref_name
        out["stats"] = stats
    if task_names:
        hay = read_text(_list(haystack)).split("\n\n") if haystack else None
        res = run_tasks(model, tok, task_names, lengths, n=samples, seed=seed, haystack=hay)
        out["tasks"] = {t: {str(n): r for n, r in by_len.items()} for t, by_len in res.items()}
        if data is None:
            out["ffn_density"] = _weighted([r for by_len in res.values() for r in by_len.values()], "ffn_density")
        out["task_config"] = {"lengths": list(lengths), "samples": samples, "seed": seed,
                              "haystack": [str(p) for p in _list(haystack)] if haystack else "noise"}
    return out


def _list(paths) -> list:
    return [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
