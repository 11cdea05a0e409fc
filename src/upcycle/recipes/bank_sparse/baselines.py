"""Post-hoc baselines on the same conversion API (same bank layout, same sparsity), by recipe name.

`apply(model, name, config, calibration_ids)` returns the model (converted in place when dense) with
the baseline's routing: `mask_fn` on each BankSparseSwiGLU for the masking baselines, a fitted
predictor for `posthoc-predictor`. The masking baselines live only in memory: a saved model keeps
its predictor, not the `mask_fn`, so evaluate them on the fly (`upcycle eval --baseline NAME`).

| name | routing | bank-balanced |
|---|---|---|
| dense | no sparsity (the model as it is) | - |
| posthoc-magnitude | top `keep` of |h| = |act(x W_gate) * x W_up| per bank, h computed densely (the oracle) | yes |
| posthoc-threshold | |act(x W_gate)| > tau_layer, tau calibrated per layer so the calibration tokens keep
  keep/bank_size of the channels (CATS/TEAL-style: needs the gate, not up/down) | no |
| global-topk | top keep/bank_size * d_ff of |h| over the whole layer (what the bank constraint costs) | no |
| posthoc-svd | predictor = truncated SVD of W_gate, no training | yes |
| posthoc-predictor | low-rank predictor fitted to the oracle mask with the LM frozen (Deja Vu-style) | yes |
| upcycled, dense-continued | checkpoints produced by continual training: evaluate them with --model | - |
"""

from __future__ import annotations

import dataclasses
import logging
import math

import torch
from torch import Tensor, nn

from upcycle.kernels.reference import bank_topk_mask
from upcycle.recipes.bank_sparse.config import BankSparseConfig
from upcycle.recipes.bank_sparse.convert import capture_ffn_inputs, convert, fit_predictor, init_predictor_svd
from upcycle.recipes.bank_sparse.modules import BankSparseSwiGLU, sparse_ffns

log = logging.getLogger(__name__)

# name -> one-line description; "checkpoint" entries are produced by training, not applied here.
BASELINES: dict[str, str] = {
    "dense": "the model as it is (a dense checkpoint: FFN density 1.0)",
    "posthoc-magnitude": "oracle: top-keep of |h| per bank, h computed densely (training-free ceiling)",
    "posthoc-threshold": "|act(x W_gate)| > tau per layer, tau calibrated to the target density (not bank-balanced)",
    "global-topk": "top keep/bank_size * d_ff of |h| over the whole layer (no bank constraint)",
    "posthoc-svd": "predictor from the truncated SVD of W_gate, no training",
    "posthoc-predictor": "low-rank predictor fitted to the oracle mask, LM frozen (Deja Vu-style)",
    "upcycled": "checkpoint: predictor-gated model after continual training (evaluate it with --model)",
    "dense-continued": "checkpoint: dense model continued on the same tokens (evaluate it with --model)",
}
ALIASES = {"oracle": "posthoc-magnitude", "threshold": "posthoc-threshold", "deja-vu": "posthoc-predictor"}
NEEDS_CALIBRATION = ("posthoc-threshold", "posthoc-predictor")
CHECKPOINTS = ("upcycled", "dense-continued")  # rows of a comparison made by training, not applied here


class OracleMask:
    """Top `keep` of |h| in every bank (`mask_fn` of BankSparseSwiGLU)."""

    def __call__(self, m: BankSparseSwiGLU, x: Tensor, g: Tensor, u: Tensor, z: Tensor) -> Tensor:
        return bank_topk_mask((m.act_fn(g) * u).abs(), m.bank_size, m.keep)


class GlobalTopKMask:
    """Top keep/bank_size * d_ff of |h| over the whole layer: the same count, no bank constraint."""

    def __call__(self, m: BankSparseSwiGLU, x: Tensor, g: Tensor, u: Tensor, z: Tensor) -> Tensor:
        h = (m.act_fn(g) * u).abs()
        k = m.n_banks * m.keep
        idx = h.topk(k, dim=-1, sorted=False).indices
        return torch.zeros_like(h, dtype=torch.bool).scatter_(-1, idx, True)


@dataclasses.dataclass
class ThresholdMask:
    """|act(g)| > tau: a per-layer magnitude threshold on the gate activation."""

    tau: float

    def __call__(self, m: BankSparseSwiGLU, x: Tensor, g: Tensor, u: Tensor, z: Tensor) -> Tensor:
        return m.act_fn(g).abs() > self.tau


def resolve(name: str) -> str:
    """The canonical baseline name; ValueError listing the valid ones."""
    canon = ALIASES.get(name, name)
    if canon not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}: choose one of {', '.join(BASELINES)} (aliases: {ALIASES}).")
    return canon


def _sparse(model: nn.Module, config: BankSparseConfig, init: str, calibration_ids: Tensor | None,
            progress: bool) -> list[BankSparseSwiGLU]:
    """The model's BankSparseSwiGLUs, converting a dense model first (its layout from `config`)."""
    modules = [m for _, m in sparse_ffns(model)]
    if modules:
        if config is not None and any(m.target_keep != config.keep_for(m.layer_idx) for m in modules):
            log.warning("model is already converted: its own keep per layer is used, not the config's")
        return modules
    cfg = dataclasses.replace(config, predictor_init=init)
    convert(model, cfg, calibration_ids=calibration_ids, progress=progress)
    return [m for _, m in sparse_ffns(model)]


@torch.no_grad()
def calibrate_thresholds(model: nn.Module, modules: list[BankSparseSwiGLU], calibration_ids: Tensor,
                         max_values: int = 1 << 24, seed: int = 0) -> list[float]:
    """Per module, the quantile 1 - keep/bank_size of |act(x W_gate)| over the calibration tokens."""
    inputs = capture_ffn_inputs(model, modules, calibration_ids, progress=False)
    gen = torch.Generator().manual_seed(seed)
    taus = []
    for m, x in zip(modules, inputs, strict=True):
        w = m.gate_proj.weight
        a = m.act_fn(m.gate_proj(x.to(w.device, w.dtype))).abs().float().reshape(-1).cpu()
        if a.numel() > max_values:
            a = a[torch.randint(a.numel(), (max_values,), generator=gen)]
        dropped = round(a.numel() * (1 - m.target_keep / m.bank_size))
        taus.append(float(a.kthvalue(dropped).values) if dropped >= 1 else -math.inf)  # keep == bank_size: all
    return taus


def apply(
    model: nn.Module,
    name: str,
    config: BankSparseConfig | None = None,
    calibration_ids: Tensor | None = None,
    progress: bool = False,
) -> nn.Module:
    """Apply baseline `name` to `model` (dense, or already converted) in place and return it.

    `config` gives the bank layout and sparsity when the model is dense (default 16 of 64).
    `posthoc-threshold` and `posthoc-predictor` need `calibration_ids` ([N, L] token ids, disjoint
    from the evaluation text).
    """
    name = resolve(name)
    config = config or BankSparseConfig()
    if name == "dense":
        return model
    if name in ("upcycled", "dense-continued"):
        raise ValueError(f"{name!r} is a trained checkpoint ({BASELINES[name]}), not a post-hoc recipe.")
    if name in NEEDS_CALIBRATION and calibration_ids is None:
        raise ValueError(f"baseline {name!r} needs calibration_ids (token ids [N, L] of held-out calibration text).")
    if name in ("posthoc-predictor", "posthoc-svd"):  # these are the low-rank predictor's baselines
        config = dataclasses.replace(config, predictor="lowrank")
    if name == "posthoc-predictor":
        already = any(True for _ in sparse_ffns(model))
        modules = _sparse(model, dataclasses.replace(config, predictor_init="calibrate"), "calibrate",
                          calibration_ids, progress)
        if already:  # converted before: refit the predictors in place on this model's own FFN inputs
            for m, x in zip(modules, capture_ffn_inputs(model, modules, calibration_ids, progress), strict=True):
                fit_predictor(m, x, steps=config.calibrate_steps_for(m.intermediate_size), lr=config.calibrate_lr)
        for m in modules:
            m.mask_fn = None
    elif name == "posthoc-svd":
        for m in _sparse(model, config, "svd", None, progress):
            init_predictor_svd(m)
            m.mask_fn = None
    else:
        # The predictor is never used by these masks: skip its initialisation.
        modules = _sparse(model, config, "none", None, progress)
        if name == "posthoc-threshold":
            for m in modules:
                m.mask_fn = None  # calibrate on what the model computes without this baseline
            keeps = [m.keep for m in modules]
            for m in modules:
                m.keep = m.bank_size  # dense while calibrating, as TEAL/CATS calibrate on the dense model
            try:
                taus = calibrate_thresholds(model, modules, calibration_ids)
            finally:
                for m, k in zip(modules, keeps, strict=True):
                    m.keep = k
            for m, tau in zip(modules, taus, strict=True):
                m.mask_fn = ThresholdMask(tau)
        else:
            mask = OracleMask() if name == "posthoc-magnitude" else GlobalTopKMask()
            for m in modules:
                m.mask_fn = mask
    model.upcycle_baseline = name
    return model


def apply_options(model: nn.Module, name: str, options: dict, calibration_ids: Tensor | None = None,
                  progress: bool = False) -> nn.Module:
    """`apply` with the sparsity as plain options (`upcycle eval --baseline NAME --keep K --bank-size B`)."""
    config = BankSparseConfig(bank_size=options.get("bank_size", 64), keep=options.get("keep", 16),
                              calibrate_steps=options.get("calib_steps"))
    return apply(model, name, config, calibration_ids, progress)
