"""One-shot N:M pruning of HF decoder models: magnitude, Wanda, SparseGPT, with sequential layer calibration.

Layers are pruned in order and the inputs of decoder layer i are the outputs of the layers before it *after*
they were pruned, so each layer is calibrated on what the sparse model feeds it (as both reference codes do).
The inputs of layer 0 and the keyword arguments every decoder layer receives (attention mask, rotary
`position_embeddings`, position ids, cache) are captured once by a pre-hook on layer 0 that stops the forward
pass, so the rest of the model never runs on the whole calibration batch.

- magnitude: the n largest |W_ij| of every group (no data).
- Wanda (Sun et al. 2023): the n largest |W_ij| * ||X_j||_2, ||X_j|| the input-channel norm over the
  calibration tokens; groups along the input dimension within each output row; no weight update.
- SparseGPT (Frantar & Alistarh 2023): H = 2/N X^T X, dampened by `damp` * mean(diag H); columns in blocks of
  `blocksize`; at every m-th column the m - n weights with the smallest w^2 / [H^-1]_jj^2 among the next m
  columns are pruned, scored on the already-updated weights; OBS update of the remaining columns through the
  upper Cholesky factor of H^-1 (lazy batch updates between blocks).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from upcycle import hf
from upcycle.recipes.nm.masks import check_nm, magnitude_mask, nm_mask

log = logging.getLogger(__name__)


def magnitude_prune(w: Tensor, n: int, m: int) -> Tensor:
    return w * magnitude_mask(w, n, m).to(w.dtype)


def wanda_prune(w: Tensor, sq_norm: Tensor, n: int, m: int) -> Tensor:
    """sq_norm [in]: sum over calibration tokens of x_j^2."""
    score = w.detach().abs().float() * sq_norm.sqrt().float().to(w.device).unsqueeze(0)
    return w * nm_mask(score, n, m).to(w.dtype)


def sparsegpt_prune(w: Tensor, hessian: Tensor, n: int, m: int, blocksize: int = 128, damp: float = 0.01) -> Tensor:
    """SparseGPT for N:M on one weight [out, in]; hessian [in, in] = 2/N X^T X. Returns the new weight."""
    out, cols = w.shape
    check_nm(n, m, cols)
    if blocksize % m:
        raise ValueError(f"blocksize={blocksize} must be a multiple of m={m}")
    W = w.detach().clone().float()
    H = hessian.detach().clone().float().to(W.device)
    dead = torch.diag(H) == 0  # inputs never active on the calibration data: their weights cannot matter
    H[dead, dead] = 1
    W[:, dead] = 0
    H.diagonal().add_(damp * torch.mean(torch.diag(H)))
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    n_prune = m - n
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)
        prune1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            if i % m == 0:
                score = W1[:, i : i + m] ** 2 / torch.diag(Hinv1)[i : i + m].unsqueeze(0) ** 2
                prune1.scatter_(1, i + score.topk(n_prune, dim=1, largest=False).indices, True)
            wcol, d = W1[:, i], Hinv1[i, i]
            q = torch.where(prune1[:, i], torch.zeros_like(wcol), wcol)
            Q1[:, i] = q
            err = (wcol - q) / d
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W.to(w.dtype)


def reconstruction_error(w_dense: Tensor, w_sparse: Tensor, xtx: Tensor) -> float:
    """||X (W - W_s)^T||^2 / ||X W^T||^2 on the calibration inputs, from xtx = X^T X."""
    d, wd, x = (w_dense - w_sparse).double(), w_dense.double(), xtx.double().to(w_dense.device)
    return float(torch.einsum("oi,ij,oj->", d, x, d) / torch.einsum("oi,ij,oj->", wd, x, wd).clamp_min(1e-300))


class _Stop(Exception):
    pass


@torch.no_grad()
def capture_layer0_inputs(model: nn.Module, calibration_ids: Tensor, batch_size: int) -> list[tuple[Tensor, dict]]:
    """[(hidden [B, L, d], kwargs)] per calibration batch, as decoder layer 0 receives them."""
    captured: list[tuple] = []

    def hook(_mod, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden, dict(kwargs)))
        raise _Stop

    handle = hf.decoder_layers(model)[0].register_forward_pre_hook(hook, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        for ids in calibration_ids.split(batch_size):
            try:
                model(input_ids=ids.to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return captured


def _run_layer(layer: nn.Module, inputs: list[tuple]) -> list[Tensor]:
    outs = []
    for hidden, kwargs in inputs:
        out = layer(hidden, **kwargs)
        outs.append(out[0] if isinstance(out, tuple) else out)  # transformers 4.x layers return tuples
    return outs


class _Stats:
    """Running input statistics of one linear: sum x^2 (Wanda) and X^T X (SparseGPT, errors), fp32."""

    def __init__(self, need_xtx: bool) -> None:
        self.need_xtx = need_xtx
        self.sq: Tensor | None = None
        self.xtx: Tensor | None = None
        self.tokens = 0

    def __call__(self, _mod, args, _out) -> None:
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        if self.sq is None:
            self.sq = torch.zeros(x.shape[1], device=x.device)
            self.xtx = torch.zeros(x.shape[1], x.shape[1], device=x.device) if self.need_xtx else None
        self.sq += (x * x).sum(0)
        if self.xtx is not None:
            self.xtx += x.T @ x
        self.tokens += x.shape[0]


@torch.no_grad()
def prune(model: nn.Module, targets: dict[int, dict[str, nn.Linear]], method: str, n: int, m: int,
          calibration_ids: Tensor | None = None, batch_size: int = 8, blocksize: int = 128, damp: float = 0.01,
          return_errors: bool = False, progress: bool = False) -> dict[str, float]:
    """Prune the linears `targets` ({layer index: {name in the layer: module}}) to n:m with `method`, in place.

    `calibration_ids` [N, L] token ids (not needed for magnitude). Returns {qualified name: reconstruction
    error on its calibration inputs} with `return_errors` (needs calibration ids), else {}.
    """
    from tqdm.auto import tqdm

    if method not in ("magnitude", "wanda", "sparsegpt"):
        raise ValueError(f"unknown one-shot method {method!r}")
    need_data = method != "magnitude" or return_errors
    if need_data and calibration_ids is None:
        raise ValueError(f"method {method!r} needs calibration_ids (token ids [N, L])")
    layers = hf.decoder_layers(model)
    inputs = capture_layer0_inputs(model, calibration_ids, batch_size) if need_data else []
    errors: dict[str, float] = {}
    last = max(targets) if targets else -1
    for i in tqdm(range(last + 1), desc=f"prune ({method})", disable=not progress):
        layer, found = layers[i], targets.get(i, {})
        stats: dict[str, _Stats] = {}
        if found and need_data:
            need_xtx = method == "sparsegpt" or return_errors
            stats = {k: _Stats(need_xtx) for k in found}
            hooks = [found[k].register_forward_hook(stats[k]) for k in found]
            try:
                _run_layer(layer, inputs)
            finally:
                for h in hooks:
                    h.remove()
        for k, lin in found.items():
            w = lin.weight.data
            if method == "magnitude":
                new = magnitude_prune(w, n, m)
            elif method == "wanda":
                new = wanda_prune(w, stats[k].sq, n, m)
            else:
                new = sparsegpt_prune(w, (2.0 / stats[k].tokens) * stats[k].xtx, n, m, blocksize, damp)
            if return_errors:
                errors[f"layers.{i}.{k}"] = reconstruction_error(w, new, stats[k].xtx)
            lin.weight.data.copy_(new)
        if need_data and i < last:  # the next layer sees this layer's pruned outputs
            inputs = [(out, kw) for out, (_, kw) in zip(_run_layer(layer, inputs), inputs, strict=True)]
    return errors


def layer_targets(model: nn.Module, names: Sequence[str], layers: Sequence[int] | None = None
                  ) -> dict[int, dict[str, nn.Linear]]:
    """{layer index: {qualified name inside the layer: nn.Linear}} of every linear whose attribute name is in
    `names`, in the decoder layers `layers` (None: all)."""
    out: dict[int, dict[str, nn.Linear]] = {}
    all_layers = hf.decoder_layers(model)
    chosen = range(len(all_layers)) if layers is None else layers
    missing = [i for i in chosen if i >= len(all_layers)]
    if missing:
        raise ValueError(f"layers {missing} do not exist: the model has {len(all_layers)} decoder layers.")
    for i in chosen:
        found = {name: mod for name, mod in all_layers[i].named_modules()
                 if isinstance(mod, nn.Linear) and name.rsplit(".", 1)[-1] in names}
        ordered = sorted(found.items(), key=lambda kv: list(names).index(kv[0].rsplit(".", 1)[-1]))
        if ordered:
            out[i] = dict(ordered)
    return out
