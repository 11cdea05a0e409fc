"""Repair one layer of a bank-sparse model: raise its keep, re-fit it on long-context activations, or make
it dense. The result is a normal bank-sparse checkpoint: the layer's keep lands in the recipe's
`keep_per_layer` when the model is saved (the recipe writes its metadata from the live modules).

- `keep`: the layer keeps K of every bank (e.g. 32 of 64) instead of the model's keep;
- `dense`: keep = bank size (the layer computes the dense FFN; its predictor is kept but unused);
- `refit`: layer-local training, no full-model backward. The dense reference runs on long token windows
  and the layer's FFN inputs and outputs are captured; then the layer alone (its FFN weights and its
  routing parameters) is trained to reproduce the dense output under its hard mask: loss = ||FFN(x) -
  y_dense||^2 / ||y_dense||^2 (+ a BCE toward the oracle mask for a low-rank predictor), the gradient
  reaching the routing through the recipe's straight-through surrogate. The keep stays (or becomes
  `keep`), so a refit costs no density.
"""

from __future__ import annotations

import logging
import math
import time

import torch
from torch import Tensor, nn

from upcycle import format as fmt
from upcycle import hf
from upcycle.recipes.layer_repair.diagnose import ffn_density, sparse_layers

log = logging.getLogger(__name__)

METHODS = ("keep", "refit", "dense")


def set_keep(model: nn.Module, layer: int, keep: int) -> tuple[int, int]:
    """Layer `layer` keeps `keep` of every bank (its training target too); returns (old keep, new keep)."""
    m = sparse_layers(model)[layer]
    if not 1 <= keep <= m.bank_size:
        raise ValueError(f"--keep {keep} must lie in [1, bank_size={m.bank_size}] (e.g. {m.bank_size // 2}).")
    old = m.keep
    m.keep = m.target_keep = keep
    return old, keep


@torch.no_grad()
def capture(reference: nn.Module, layer: int, windows: Tensor, batch_size: int = 1) -> tuple[Tensor, Tensor]:
    """Inputs and outputs ([tokens, d] float32 each, on CPU) of `reference`'s FFN at `layer` on token windows."""
    ffns = {idx: m for _, idx, m in hf.glu_modules(reference)}
    if layer not in ffns:
        raise ValueError(f"the reference has no FFN at layer {layer} (its FFN layers: {min(ffns)}-{max(ffns)}).")
    xs, ys = [], []

    def keep(mod, args, out):
        xs.append(args[0].reshape(-1, args[0].shape[-1]).float().cpu())
        ys.append(out.reshape(-1, out.shape[-1]).float().cpu())

    hook = ffns[layer].register_forward_hook(keep)
    device = next(reference.parameters()).device
    try:
        for i in range(0, len(windows), batch_size):
            reference(windows[i : i + batch_size].to(device), use_cache=False)
    finally:
        hook.remove()
    return torch.cat(xs), torch.cat(ys)


def _nmse(pred: Tensor, target: Tensor) -> Tensor:
    return (pred.float() - target).pow(2).sum() / target.pow(2).sum().clamp_min(1e-30)


@torch.no_grad()
def layer_error(m: nn.Module, x: Tensor, y: Tensor, batch_tokens: int = 4096) -> float:
    """||FFN(x) - y||^2 / ||y||^2 of the sparse FFN under its hard mask (no-grad forward)."""
    device, dtype = m.gate_proj.weight.device, m.gate_proj.weight.dtype
    err = norm = 0.0
    for i in range(0, len(x), batch_tokens):
        xb, yb = x[i : i + batch_tokens].to(device, dtype), y[i : i + batch_tokens].to(device)
        out = m(xb).float()
        err += float((out - yb).pow(2).sum())
        norm += float(yb.pow(2).sum())
    return err / max(norm, 1e-30)


def refit(model: nn.Module, layer: int, x: Tensor, y: Tensor, steps: int = 200, lr: float = 1e-4,
          batch_tokens: int = 2048, routing_lr_mult: float = 10.0, aux_weight: float = 0.1, holdout: float = 0.1,
          seed: int = 0, progress: bool = False) -> dict:
    """Train layer `layer`'s FFN and routing (alone) to reproduce `y` = dense FFN(x) under the hard mask.

    AdamW with warm-up and cosine decay; `holdout` of the tokens (the last ones) is held out for the error
    reported before and after. Returns {"steps", "tokens", "error_before", "error_after", "seconds"}."""
    from tqdm.auto import tqdm

    from upcycle.train.schedules import lr_factor

    m = sparse_layers(model)[layer]
    if len(x) < 2:
        raise ValueError("refit needs captured activations of at least 2 tokens.")
    n_val = max(1, int(len(x) * holdout)) if holdout > 0 else 0
    xt, yt = (x[:-n_val], y[:-n_val]) if n_val else (x, y)
    xv, yv = (x[-n_val:], y[-n_val:]) if n_val else (x, y)
    before = layer_error(m, xv, yv)
    device, dtype = m.gate_proj.weight.device, m.gate_proj.weight.dtype
    routing = [p for n, p in m.named_parameters() if n.startswith("predictor.") or n == "gate_scale"]
    ids = {id(p) for p in routing}
    ffn = [p for p in m.parameters() if id(p) not in ids]
    groups = [{"params": ffn, "lr": lr}]
    if routing:
        groups.append({"params": routing, "lr": lr * routing_lr_mult})
    was = {p: p.requires_grad for p in m.parameters()}
    for p in m.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(groups, weight_decay=0.0, betas=(0.9, 0.95))
    base = [g["lr"] for g in groups]
    gen = torch.Generator().manual_seed(seed)
    lowrank = m.predictor.kind == "lowrank"
    t0 = time.perf_counter()
    m.train()
    losses = []
    try:
        for step in tqdm(range(steps), desc=f"refit layer {layer}", disable=not progress):
            for g, b in zip(opt.param_groups, base, strict=True):
                g["lr"] = b * lr_factor(step, steps, max(1, steps // 20), 0.1)
            idx = torch.randint(len(xt), (min(batch_tokens, len(xt)),), generator=gen)
            xb, yb = xt[idx].to(device, dtype), yt[idx].to(device)
            m.record_aux = lowrank and aux_weight > 0
            with torch.enable_grad():
                loss = _nmse(m(xb), yb)
                if m.record_aux and m.aux_loss is not None:
                    loss = loss + aux_weight * m.aux_loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            if not math.isfinite(loss.item()):
                raise RuntimeError(f"refit of layer {layer}: non-finite loss at step {step}; lower --lr (now {lr}).")
            opt.step()
            losses.append(loss.item())
    finally:
        m.record_aux, m.aux_loss = False, None
        for p, flag in was.items():
            p.requires_grad_(flag)
        m.eval()
    after = layer_error(m, xv, yv)
    return {"steps": steps, "tokens": len(xt), "heldout_tokens": n_val, "error_before": before, "error_after": after,
            "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
            "lr": lr, "batch_tokens": batch_tokens, "seconds": time.perf_counter() - t0}


def repair(model: nn.Module, layer: int, method: str, keep: int | None = None, reference: nn.Module | None = None,
           windows: Tensor | None = None, **refit_kw) -> dict:
    """Repair `layer` of `model` in place; returns the record saved in the checkpoint's metadata (`repairs`)."""
    if method not in METHODS:
        raise ValueError(f"--method {method!r} is not one of {', '.join(METHODS)}.")
    ffns = sparse_layers(model)
    if layer not in ffns:
        valid = sorted(ffns)
        raise ValueError(f"--layer {layer} out of range: this model's bank-sparse FFN layers are "
                         f"{valid[0]}-{valid[-1]}.")
    m = ffns[layer]
    density_before = ffn_density(model)
    record: dict = {"layer": layer, "method": method, "keep_before": m.keep}
    if method == "dense":
        set_keep(model, layer, m.bank_size)
    elif method == "keep":
        set_keep(model, layer, keep if keep is not None else min(m.bank_size, 2 * m.keep))
    else:
        if reference is None or windows is None:
            raise ValueError("--method refit needs the dense reference and long-context text (--data FILE).")
        if keep is not None:
            set_keep(model, layer, keep)
        x, y = capture(reference, layer, windows)
        record["refit"] = refit(model, layer, x, y, **refit_kw)
        record["refit"]["seq_len"] = int(windows.shape[1])
    record["keep_after"] = m.keep
    record["ffn_density_before"], record["ffn_density_after"] = density_before, ffn_density(model)
    record["ffn_density_increase"] = record["ffn_density_after"] - density_before
    meta = getattr(model.config, fmt.KEY, None)
    if isinstance(meta, dict):
        meta.setdefault("repairs", []).append({k: v for k, v in record.items() if k != "refit"} | (
            {"refit": {k: record["refit"][k] for k in ("steps", "tokens", "seq_len", "error_before", "error_after")}}
            if "refit" in record else {}))
    return record
