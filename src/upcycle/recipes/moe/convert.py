"""MoE conversion: build `MoESwiGLU` layers from the dense SwiGLU FFNs of an HF decoder, in place, and the
metadata round trip.

Order of operations per layer (all in fp32 on CPU, cast back to the dense dtype and device at the end):
  1. partition the d_ff channels into G slices (contiguous, or clustered on calibration activations);
  2. slices 0..S-1 -> shared expert, slice S+j of copy c -> routed expert c*R + j;
  3. Drop-Upcycling on routed experts (re-init round(r*f) channels from the dense matrices' mean/std);
  4. weight scaling by `MoEUpcycleConfig.activation_scale` (routed experts only; shared ones have weight 1);
  5. router init (random / virtual group / calibrated).
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from upcycle import format as fmt
from upcycle import hf, hf_models
from upcycle.recipes.moe.config import MoEUpcycleConfig
from upcycle.recipes.moe.modules import MoESwiGLU, SharedExpert, moe_ffns
from upcycle.recipes.moe.partition import cluster_partition, contiguous_partition

log = logging.getLogger(__name__)

NAME = "moe"
CALIBRATION_TOKENS = 8192  # MLP inputs kept per layer for clustering / the calibrated router


def _dense_weights(mlp: nn.Module, where: str) -> tuple[Tensor, Tensor, Tensor]:
    for name in hf.GLU_LINEARS:
        if getattr(mlp, name).bias is not None:
            raise ValueError(f"{where}.{name} has a bias (mlp_bias=True): biased FFNs cannot become MoE experts "
                             "(no target class has expert biases); convert a model without FFN biases.")
    return tuple(getattr(mlp, n).weight.detach().float().cpu() for n in hf.GLU_LINEARS)  # [F, d], [F, d], [d, F]


def _intermediate(x: Tensor, wg: Tensor, wu: Tensor, act) -> Tensor:
    """x [N, d] -> act(x wg^T) * (x wu^T), [N, F']."""
    return act(x @ wg.t()) * (x @ wu.t())


def _drop_upcycle(gu: Tensor, down: Tensor, dense: tuple, ratio: float, gen: torch.Generator) -> None:
    """In place on gu [E, 2f, d], down [E, d, f]: per expert, redraw round(ratio*f) channels.

    Each matrix's new entries come from N(mean, std) of the corresponding dense matrix (Drop-Upcycling,
    Nakamura et al. 2025); each expert draws its own channel subset, which is what breaks expert symmetry.
    """
    wg, wu, wd = dense
    num_experts, d, f = down.shape
    n = round(ratio * f)
    if n == 0:
        return
    (mg, sg), (mu, su), (md, sd) = [(w.mean().item(), w.std().item()) for w in (wg, wu, wd)]
    for e in range(num_experts):
        ch = torch.randperm(f, generator=gen)[:n]
        gu[e, ch] = torch.randn(n, d, generator=gen) * sg + mg
        gu[e, f + ch] = torch.randn(n, d, generator=gen) * su + mu
        down[e][:, ch] = torch.randn(d, n, generator=gen) * sd + md


def _calibrated_router(x: Tensor, gu: Tensor, down: Tensor, act, gen: torch.Generator) -> Tensor:
    """Ridge regression of per-expert log output norms on router inputs -> [E, d] router rows.

    Target y[n, e] = log ||expert_e(x_n)||, centred per token, so softmax(logits) approximates the experts'
    relative contributions on calibration data. A tiny random perturbation breaks exact ties between copies.
    """
    f = down.shape[2]
    y = torch.stack([(_intermediate(x, gu[e, :f], gu[e, f:], act) @ down[e].t()).norm(dim=-1)
                     for e in range(gu.shape[0])], dim=1)  # [N, E]
    y = (y + 1e-6).log()
    y = y - y.mean(dim=1, keepdim=True)
    xtx = x.t() @ x  # [d, d]
    lam = 1e-3 * xtx.diagonal().mean().clamp_min(1e-12)
    w = torch.linalg.solve(xtx + lam * torch.eye(x.shape[1]), x.t() @ y).t()  # [E, d]
    return w + 1e-3 * w.std() * torch.randn(w.shape, generator=gen)


def _router_weight(cfg: MoEUpcycleConfig, d: int, gu: Tensor, down: Tensor, act, calib_x, gen) -> Tensor:
    if cfg.router_init == "calibrate":
        return _calibrated_router(calib_x, gu, down, act, gen)
    rows = cfg.num_copies if cfg.router_init == "virtual_group" else cfg.num_experts
    w = torch.randn(rows, d, generator=gen) * cfg.router_init_std
    if cfg.router_init == "virtual_group":
        w = w.repeat_interleave(cfg.experts_per_copy, dim=0)  # row c*R + j = row of copy c
    return w


def upcycle_ffn(dense_mlp: nn.Module, config: MoEUpcycleConfig, layer_idx: int = 0, calib_x: Tensor | None = None,
                backend: str = "auto") -> MoESwiGLU:
    """One dense SwiGLU MLP -> a `MoESwiGLU` (see the module docstring for the steps).

    `calib_x`: [N, d] inputs of this MLP on calibration text; needed by split_by="cluster" and
    router_init="calibrate". `layer_idx` mixes into the seed so layers get different random choices.
    """
    cfg = config
    if cfg.needs_calibration and calib_x is None:
        what = " and ".join(k for k, on in (("split_by='cluster'", cfg.split_by == "cluster"),
                                            ("router_init='calibrate'", cfg.router_init == "calibrate")) if on)
        raise ValueError(f"{what} need calibration text: pass calibration_ids (token ids [N, L]) to convert, or "
                         "--data FILE to `upcycle convert`; or use split_by='contiguous' / router_init='random'.")
    wg, wu, wd = _dense_weights(dense_mlp, f"layer {layer_idx} mlp")
    act = getattr(dense_mlp, "act_fn", None) or nn.SiLU()
    d_ff, d = wg.shape
    f = cfg.expert_size(d_ff)
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + layer_idx)
    x = calib_x.detach().reshape(-1, d).float().cpu() if calib_x is not None else None

    g = cfg.slices_per_copy
    if cfg.split_by == "cluster":
        parts = cluster_partition(_intermediate(x, wg, wu, act), g, seed=cfg.seed + layer_idx)
    else:
        parts = contiguous_partition(d_ff, g)  # [G, f]
    routed = parts[cfg.shared_experts:].repeat(cfg.num_copies, 1)  # [E, f], expert c*R + j -> slice S + j
    gu = torch.cat([wg[routed], wu[routed]], dim=1)  # [E, 2f, d]
    down = wd[:, routed].permute(1, 0, 2).contiguous()  # [E, d, f]
    _drop_upcycle(gu, down, (wg, wu, wd), cfg.drop_upcycle, gen)

    s = cfg.activation_scale()
    if cfg.weight_scaling == "exact":
        down *= s
    elif cfg.weight_scaling == "cube_root":
        gu *= s ** (1 / 3)
        down *= s ** (1 / 3)
    router = _router_weight(cfg, d, gu, down, act, x, gen)

    ref = dense_mlp.down_proj.weight
    moe = MoESwiGLU(d, f, cfg, act_fn=act, backend=backend, layer_idx=layer_idx, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        moe.gate.weight.copy_(router)
        moe.experts.gate_up_proj.copy_(gu)
        moe.experts.down_proj.copy_(down)
        if moe.shared_expert is not None:
            shared = parts[: cfg.shared_experts].reshape(-1)  # [S*f]
            moe.shared_expert.gate_proj.weight.copy_(wg[shared])
            moe.shared_expert.up_proj.weight.copy_(wu[shared])
            moe.shared_expert.down_proj.weight.copy_(wd[:, shared])
    return moe.to(device=ref.device, dtype=ref.dtype).train(dense_mlp.training)


def find_dense_ffns(model: nn.Module) -> dict[int, tuple[str, nn.Module]]:
    """{layer index: (name, module)} of every dense SwiGLU FFN; ValueError naming the problem if none."""
    if any(True for _ in moe_ffns(model)):
        raise ValueError(f"{type(model).__name__} is already converted to MoE: convert the original dense model "
                         "instead.")
    return {idx: (name, m) for name, idx, m in hf.swiglu_ffns(model, skip=(MoESwiGLU, SharedExpert))}


def _selected(model: nn.Module, config: MoEUpcycleConfig) -> tuple[list[int], dict[int, tuple[str, nn.Module]]]:
    by_layer = find_dense_ffns(model)
    layers = config.moe_layer_indices(len(hf.decoder_layers(model)))
    missing = [i for i in layers if i not in by_layer]
    if missing:
        raise ValueError(f"layers {missing} have no SwiGLU FFN; this model has FFN layers {sorted(by_layer)}.")
    if not layers:
        raise ValueError(f"layers={config.layers} selects no layer of this {len(by_layer)}-layer model.")
    return layers, by_layer


@torch.no_grad()
def capture_mlp_inputs(model: nn.Module, mlps: dict[int, nn.Module], input_ids: Tensor, progress: bool = True,
                       batch_size: int = 8, max_tokens: int = CALIBRATION_TOKENS) -> dict[int, Tensor]:
    """Run the dense model on `input_ids` [N, L]; each MLP's inputs, at most `max_tokens` rows [n, d] (fp32)."""
    store: dict[int, list[Tensor]] = {i: [] for i in mlps}
    held = dict.fromkeys(mlps, 0)

    def keep(i: int):
        def hook(mod, args):
            if held[i] < max_tokens:
                x = args[0].reshape(-1, args[0].shape[-1])[: max_tokens - held[i]].float().cpu()
                store[i].append(x)
                held[i] += x.shape[0]
        return hook

    hooks = [m.register_forward_pre_hook(keep(i)) for i, m in mlps.items()]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, len(input_ids), batch_size), desc="capture", disable=not progress):
            if min(held.values()) >= max_tokens:
                break
            model(input_ids[start: start + batch_size].to(device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return {i: torch.cat(v) for i, v in store.items()}


def convert(model: nn.Module, config: MoEUpcycleConfig | None = None, calibration_ids: Tensor | None = None,
            progress: bool = True, backend: str = "auto") -> nn.Module:
    """Swap the selected SwiGLU FFNs of `model` for `MoESwiGLU` layers built from them, in place; returns `model`.

    `calibration_ids` ([N, L] token ids) are needed by split_by="cluster" and router_init="calibrate".
    """
    config = config or MoEUpcycleConfig()
    layers, by_layer = _selected(model, config)
    d_ff = by_layer[layers[0]][1].gate_proj.out_features
    config.expert_size(d_ff)  # a split that does not divide d_ff: refused before any work
    for i in layers:
        _dense_weights(by_layer[i][1], by_layer[i][0])
    calib: dict[int, Tensor] = {}
    if config.needs_calibration:
        if calibration_ids is None:
            upcycle_ffn(by_layer[layers[0]][1], config, layers[0])  # raises the error naming the fix
        calib = capture_mlp_inputs(model, {i: by_layer[i][1] for i in layers}, calibration_ids, progress)
    for i in tqdm(layers, desc="convert", disable=not progress):
        name, dense = by_layer[i]
        hf.replace_module(model, name, upcycle_ffn(dense, config, i, calib.get(i), backend))
        calib.pop(i, None)
    _write_metadata(model, config)
    return model


def _write_metadata(model: nn.Module, config: MoEUpcycleConfig) -> None:
    if hasattr(model, "config"):
        hf_models.attach(model)  # first: the metadata goes on the model's own config, never a shared one
        previous = fmt.parse(getattr(model.config, fmt.KEY, None), "model.config")
        extra = previous.extra if previous is not None else {}
        setattr(model.config, fmt.KEY, fmt.make(NAME, metadata(model, config), **extra))


def saved_config(model: nn.Module) -> MoEUpcycleConfig:
    meta = fmt.parse(getattr(getattr(model, "config", None), fmt.KEY, None), "model.config")
    if meta is None or meta.recipe != NAME:
        raise ValueError(f"{type(model).__name__} is not an MoE model (no upcycle.{NAME} metadata).")
    return config_from_section(meta.section, "model.config")


def metadata(model: nn.Module, config: MoEUpcycleConfig | None = None) -> dict:
    """The recipe's section of config.json["upcycle"]: the config, with the MoE layers as built."""
    config = config or saved_config(model)
    d = config.to_dict()
    d["layers"] = sorted(moe_layers_of(model)) or d["layers"]
    return d


def moe_layers_of(model: nn.Module) -> dict[int, MoESwiGLU]:
    return {m.layer_idx: m for _, m in moe_ffns(model)}


def config_from_section(section: dict, where: str = "config.json") -> MoEUpcycleConfig:
    return MoEUpcycleConfig.from_dict(section, where=where)


def build(model: nn.Module, config: MoEUpcycleConfig, backend: str = "auto") -> nn.Module:
    """The MoE structure of `config` on `model` without initialising it from the dense FFNs (the weights are
    loaded afterwards): what loading a saved checkpoint does."""
    layers, by_layer = _selected(model, config)
    for i in layers:
        name, dense = by_layer[i]
        ref = dense.down_proj.weight
        d_ff, d = dense.gate_proj.out_features, dense.gate_proj.in_features
        moe = MoESwiGLU(d, config.expert_size(d_ff), config, act_fn=dense.act_fn, backend=backend, layer_idx=i,
                        device=ref.device, dtype=ref.dtype)
        hf.replace_module(model, name, moe.train(dense.training))
    _write_metadata(model, config)
    return model


def from_metadata(model: nn.Module, section: dict) -> None:
    """Rebuild the MoE layers on a freshly built model (weights are loaded afterwards)."""
    build(model, config_from_section(section))


def dense_ffn_params(model: nn.Module) -> int:
    """Parameters of the dense parent's FFNs in the converted layers (3 * d * d_ff each)."""
    d_ff = getattr(getattr(model, "config", None), "intermediate_size", None)
    return sum(3 * m.hidden_size * (d_ff or m.expert_size * m.config.slices_per_copy) for _, m in moe_ffns(model))
