"""Bank-sparse conversion: swap SwiGLU FFNs for BankSparseSwiGLU in place, the metadata round trip,
predictor initialisation (svd / calibrate) and recall of the oracle mask."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from upcycle import format as fmt
from upcycle import hf, hf_models
from upcycle.kernels.reference import bank_topk_indices, bank_topk_mask
from upcycle.recipes import stacking
from upcycle.recipes.bank_sparse.config import BankSparseConfig
from upcycle.recipes.bank_sparse.modules import BankSparseSwiGLU, DenseSwiGLU, sparse_ffns
from upcycle.recipes.bank_sparse.predictors import lowrank_bytes_fraction, shadow_bytes_fraction

log = logging.getLogger(__name__)

NAME = "bank_sparse"


def find_swiglu_ffns(model: nn.Module) -> list[tuple[str, int, nn.Module]]:
    """(name, layer index, module) of every dense SwiGLU FFN; ValueError naming the problem if none."""
    try:
        return hf.swiglu_ffns(model, skip=(BankSparseSwiGLU,))
    except ValueError:
        if any(isinstance(m, BankSparseSwiGLU) for m in model.modules()):
            raise ValueError(f"{type(model).__name__} is already converted: convert the original dense model "
                             "instead.") from None
        raise


def convert(
    model: nn.Module,
    config: BankSparseConfig | None = None,
    calibration_ids: Tensor | None = None,
    progress: bool = True,
) -> nn.Module:
    """Swap every selected SwiGLU FFN of `model` for a BankSparseSwiGLU, in place; returns `model`.

    Dense weights are reused as they are (same tensors, same HF names); the predictor is initialised
    by `config.predictor_init`. `calibrate` needs `calibration_ids` ([N, L] token ids).
    """
    config = config or BankSparseConfig()
    ffns = find_swiglu_ffns(model)
    by_layer = {idx: (name, m) for name, idx, m in ffns}
    layers = sorted(by_layer) if config.layers is None else config.layers
    missing = [i for i in layers if i not in by_layer]
    if missing:
        raise ValueError(
            f"layers {missing} have no SwiGLU FFN; this model has FFN layers {sorted(by_layer)}."
        )
    stray = [i for i in config.keep_per_layer if i not in layers]
    if stray:
        raise ValueError(f"keep_per_layer names layers {stray} that are not converted (layers={layers}).")
    d_ff = by_layer[layers[0]][1].gate_proj.out_features
    if d_ff % config.bank_size:
        raise ValueError(
            f"intermediate_size={d_ff} is not divisible by bank_size={config.bank_size}: "
            f"choose a bank_size that divides {d_ff} (e.g. {_divisor_near(d_ff, config.bank_size)})."
        )
    if config.predictor_init == "calibrate" and calibration_ids is None:
        raise ValueError("predictor_init='calibrate' needs calibration_ids (token ids [N, L]); or use 'svd'.")
    if config.keep_allocation == "mass":
        if calibration_ids is None:
            raise ValueError("keep_allocation='mass' needs calibration_ids (token ids [N, L]; CLI: --data).")
        free = [i for i in layers if i not in config.keep_per_layer]
        xs = capture_ffn_inputs(model, [by_layer[i][1] for i in free], calibration_ids, progress)
        keeps = allocate_keep([by_layer[i][1] for i in free], xs, config.bank_size, config.keep)
        config = dataclasses.replace(config, keep_per_layer={**config.keep_per_layer, **dict(zip(free, keeps,
                                                                                               strict=True))},
                                     keep_allocation="uniform")
        log.info("keep per layer (mass allocation): %s", dict(zip(free, keeps, strict=True)))

    dense0 = by_layer[layers[0]][1]
    spec = config.predictor_spec(dense0.gate_proj.in_features, d_ff)
    lowrank = spec["predictor"] == "lowrank"
    captured = None
    calibrate = config.predictor_init == "calibrate" and lowrank
    if calibrate:
        captured = capture_ffn_inputs(model, [by_layer[i][1] for i in layers], calibration_ids, progress)
        config = dataclasses.replace(config, calibrate_steps=config.calibrate_steps_for(d_ff))  # saved as run
        log.info("predictor fit: %d steps per layer (calibrate_steps; CLI --calib-steps)", config.calibrate_steps)
    # calibrating, the fit's steps are the work: one bar over them instead of one over the layers
    fit_bar = tqdm(total=len(layers) * config.calibrate_steps if calibrate else 0, desc="calibrate", unit="step",
                   disable=not (progress and calibrate))
    for i in tqdm(layers, desc="convert", disable=not progress or calibrate):
        name, dense = by_layer[i]
        sparse = BankSparseSwiGLU(
            dense.gate_proj,
            dense.up_proj,
            dense.down_proj,
            dense.act_fn,
            bank_size=config.bank_size,
            keep=config.keep_for(i),
            rank=spec.get("predictor_rank"),
            gate_mode=config.gate_mode,
            ste_temperature=config.ste_temperature,
            sigmoid_scale_init=config.sigmoid_scale_init,
            layer_idx=i,
            shadow=None if lowrank else (spec["shadow_bits"], spec["shadow_group_size"]),
            shadow_bias=config.shadow_bias,
        )
        if lowrank and config.predictor_init in ("svd", "calibrate"):
            init_predictor_svd(sparse)
        if lowrank and config.predictor_init == "calibrate":
            fit_bar.set_postfix(layer=i, refresh=False)
            fit_predictor(sparse, captured.pop(0), steps=config.calibrate_steps, lr=config.calibrate_lr,
                          on_step=fit_bar.update)
        hf.replace_module(model, name, sparse)
    fit_bar.close()

    if hasattr(model, "config"):
        hf_models.attach(model)  # first: the metadata goes on the model's own config, never a shared one
        previous = fmt.parse(getattr(model.config, fmt.KEY, None), "model.config")
        extra = stacking.extra_after(previous, NAME)  # e.g. an N:M model's section, kept under "stacked"
        setattr(model.config, fmt.KEY, fmt.make(NAME, metadata(model, config), **extra))
    return model


def to_dense(model: nn.Module) -> nn.Module:
    """Swap every BankSparseSwiGLU back to a dense SwiGLU (same weight tensors), in place.

    The predictor is dropped; the result computes the dense function of the current FFN weights
    (the frozen teacher of distillation, the `dense` row of a comparison).
    """
    for name, m in list(sparse_ffns(model)):
        hf.replace_module(model, name, DenseSwiGLU(m.gate_proj, m.up_proj, m.down_proj, m.act_fn))
    if hasattr(model, "config") and hasattr(model.config, fmt.KEY):
        delattr(model.config, fmt.KEY)
    hf_models.detach(model)
    return model


@torch.no_grad()
def allocate_keep(ffns: list[nn.Module], inputs: list[Tensor], bank_size: int, keep: int,
                  step: int = 4) -> list[int]:
    """Keep per layer, multiples of `step` in [step, bank_size], averaging exactly `keep`, that keep the most
    |h| mass: a layer whose magnitude is spread over many channels of a bank gets more of them, a peaked one
    fewer (the post-hoc oracle keeps 61-72% of the mass in SmolLM2's early-middle layers, 85% in the last).
    Greedy on the largest gain in mean kept mass per added channel, from `step` everywhere (the gains shrink
    with keep: the curve of sorted magnitudes is concave), on the layers' own calibration inputs."""
    grid = list(range(step, bank_size + 1, step))
    curves = []  # per layer: mean fraction of |h| mass kept at each grid keep
    for m, x in zip(ffns, inputs, strict=True):
        w = m.gate_proj.weight
        xb = x[: 1 << 14].to(w.device, w.dtype)
        h = (m.act_fn(m.gate_proj(xb)) * m.up_proj(xb)).abs().float()
        banks = h.reshape(len(h), -1, bank_size).sort(-1, descending=True).values.cumsum(-1)
        frac = banks / banks[..., -1:].clamp_min(1e-30)  # [tokens, banks, bank_size]
        curves.append([float(frac[..., k - 1].mean()) for k in grid])
    n = len(ffns)
    total = n * keep
    if total < n * step or keep > bank_size:
        return [keep] * n
    at = [0] * n  # grid index per layer
    used = n * step
    while used < total:
        gains = [(curves[i][at[i] + 1] - curves[i][at[i]]) / step if at[i] + 1 < len(grid) else -1.0
                 for i in range(n)]
        best = max(range(n), key=lambda i: gains[i])
        if gains[best] < 0 or used + step > total:
            break
        at[best] += 1
        used += step
    keeps = [grid[a] for a in at]
    # a remainder smaller than `step` (keep not a multiple of it) goes to the layers that gain most from it
    for i in sorted(range(n), key=lambda i: -curves[i][min(at[i] + 1, len(grid) - 1)])[: total - used]:
        keeps[i] += 1
    return keeps


def _divisor_near(n: int, target: int) -> int:
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    return min(divisors, key=lambda d: (abs(d - target), -d))


def saved_config(model: nn.Module) -> BankSparseConfig:
    """The config the model was converted with (from its metadata), as `metadata` refreshes it."""
    meta = fmt.parse(getattr(model.config, fmt.KEY, None), "model.config")
    if meta is None or meta.recipe != NAME:
        raise ValueError(f"{type(model).__name__} is not a bank-sparse model (no upcycle.{NAME} metadata).")
    return config_from_section(meta.section, "model.config")


def metadata(model: nn.Module, config: BankSparseConfig | None = None) -> dict:
    """The recipe's section of config.json["upcycle"]: the config, synced with each module's live `keep`."""
    config = config or saved_config(model)
    modules = [m for _, m in sparse_ffns(model)]
    d = config.to_dict()
    d["layers"] = [m.layer_idx for m in modules]
    d["keep_per_layer"] = {str(m.layer_idx): m.keep for m in modules if m.keep != config.keep}
    d["predictor_init"] = "none"  # a saved predictor is loaded, never re-initialised
    if modules:  # the resolved predictor, so that loading rebuilds exactly this one
        pred = modules[0].predictor
        d["predictor"] = pred.kind
        if pred.kind == "lowrank":
            d["predictor_rank"], d["shadow_bits"], d["shadow_group_size"] = pred.rank, None, None
        else:
            d["predictor_rank"], d["shadow_bits"], d["shadow_group_size"] = None, pred.bits, pred.group_size
    return d


def config_from_section(section: dict, where: str = "config.json") -> BankSparseConfig:
    """A saved section back to a BankSparseConfig (no re-initialisation of the saved predictor). Sections
    written before the shadow's learned bias existed have none."""
    return BankSparseConfig.from_dict({"shadow_bias": False, **section, "predictor_init": "none"}, where=where)


def from_metadata(model: nn.Module, section: dict) -> None:
    """Rebuild the converted modules on a freshly built model (weights are loaded afterwards)."""
    convert(model, config_from_section(section), progress=False)


def predictor_bytes_fraction(model: nn.Module) -> float:
    """Bytes the predictors read per token over the dense FFNs' 16-bit bytes (the predictor_budget unit)."""
    fractions = []
    for _, m in sparse_ffns(model):
        p = m.predictor
        fractions.append(lowrank_bytes_fraction(m.hidden_size, m.intermediate_size, p.rank) if p.kind == "lowrank"
                         else shadow_bytes_fraction(p.bits, p.group_size))
    return sum(fractions) / max(1, len(fractions))


@torch.no_grad()
def init_predictor_svd(m: BankSparseSwiGLU) -> None:
    """Logits ~ x W_gate^T by truncated SVD: W_gate ~ (U sqrt(S)) (sqrt(S) V^T)."""
    w = m.gate_proj.weight.float()
    U, S, Vh = torch.linalg.svd(w, full_matrices=False)
    r = m.predictor.rank
    root = S[:r].sqrt()
    n = root.shape[0]  # a rank above min(d, d_ff) leaves the extra directions at zero
    m.predictor.in_proj.weight.zero_()
    m.predictor.out_proj.weight.zero_()
    m.predictor.in_proj.weight[:n] = (root[:, None] * Vh[:r]).to(m.predictor.in_proj.weight.dtype)
    m.predictor.out_proj.weight[:, :n] = (U[:, :r] * root).to(m.predictor.out_proj.weight.dtype)
    bias = m.gate_proj.bias
    m.predictor.out_proj.bias.copy_(bias if bias is not None else torch.zeros_like(m.predictor.out_proj.bias))


@torch.no_grad()
def capture_ffn_inputs(
    model: nn.Module, ffns: list[nn.Module], input_ids: Tensor, progress: bool = True, batch_size: int = 8
) -> list[Tensor]:
    """Run the model on `input_ids` [N, L] and return each FFN's inputs, [N * L, d] per FFN (float32)."""
    store: list[list[Tensor]] = [[] for _ in ffns]

    def keep_input(j: int):
        return lambda mod, args: store[j].append(args[0].reshape(-1, args[0].shape[-1]).float().cpu())

    hooks = [f.register_forward_pre_hook(keep_input(j)) for j, f in enumerate(ffns)]
    device = next(model.parameters()).device
    try:
        for start in tqdm(range(0, len(input_ids), batch_size), desc="capture", disable=not progress):
            model(input_ids[start : start + batch_size].to(device))
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(s) for s in store]


def oracle_scores(m: BankSparseSwiGLU, x: Tensor) -> Tensor:
    """|h| of the dense FFN: the magnitude the oracle ranks channels by."""
    return (m.act_fn(m.gate_proj(x)) * m.up_proj(x)).abs()


def fit_predictor(
    m: BankSparseSwiGLU, x: Tensor, steps: int = 300, lr: float = 1e-2, batch: int = 1024, seed: int = 0,
    on_step: Callable[[int], object] | None = None,
) -> None:
    """Fit the predictor (LM frozen) so each bank's top `keep` logits match the top `keep` of |h|.

    Loss: in-bank softmax cross-entropy toward the oracle top-k set (a listwise ranking loss) plus
    BCE on the oracle mask. The listwise term cares only about order within a bank, which is all
    the mask uses. `on_step(1)` is called after every step (a progress bar's `update`).
    """
    gen = torch.Generator().manual_seed(seed)
    pred = m.predictor
    dtype = pred.in_proj.weight.dtype
    device = pred.in_proj.weight.device
    params = {n: p.detach().float().clone().requires_grad_(True) for n, p in pred.named_parameters()}
    opt = torch.optim.Adam(params.values(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    wg, wu = m.gate_proj.weight.detach().float(), m.up_proj.weight.detach().float()
    bg = None if m.gate_proj.bias is None else m.gate_proj.bias.detach().float()
    bu = None if m.up_proj.bias is None else m.up_proj.bias.detach().float()
    for _ in range(steps):
        xb = x[torch.randint(len(x), (min(batch, len(x)),), generator=gen)].to(device)
        with torch.no_grad():
            h = F.silu(F.linear(xb, wg, bg)) * F.linear(xb, wu, bu)
            target = bank_topk_mask(h.abs(), m.bank_size, m.target_keep)
        z = F.linear(F.linear(xb, params["in_proj.weight"]), params["out_proj.weight"], params["out_proj.bias"])
        loss = ranking_loss(z, target, m.bank_size)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if on_step is not None:
            on_step(1)
    with torch.no_grad():
        for n, p in pred.named_parameters():
            p.copy_(params[n].to(dtype))


def ranking_loss(z: Tensor, target: Tensor, bank_size: int) -> Tensor:
    """Listwise in-bank cross-entropy toward the oracle set + BCE on the mask."""
    zb = z.reshape(-1, bank_size)
    tb = target.reshape(-1, bank_size).float()
    listwise = -(tb / tb.sum(-1, keepdim=True) * zb.log_softmax(-1)).sum(-1).mean()
    return listwise + F.binary_cross_entropy_with_logits(z, target.float())


@torch.no_grad()
def predictor_recall(m: BankSparseSwiGLU, x: Tensor, keep: int | None = None) -> float:
    """Mean fraction of the oracle top-`keep` (by |h|) channels per bank that the predictor keeps."""
    keep = keep or m.target_keep
    x = x.to(m.gate_proj.weight.device, m.gate_proj.weight.dtype)
    pred = bank_topk_indices(m.predictor(x).float(), m.bank_size, keep)
    oracle = bank_topk_mask(oracle_scores(m, x).float(), m.bank_size, keep)
    return oracle.gather(-1, pred).float().mean().item()


@torch.no_grad()
def measure_recall(model: nn.Module, input_ids: Tensor, batch_size: int = 8) -> dict[int, float]:
    """Per-layer recall of the oracle top-k (by |h|) on each sparse FFN's actual inputs in `model`."""
    totals: dict[int, list[float]] = {}

    def hook(m: BankSparseSwiGLU, args) -> None:
        x = args[0].reshape(-1, args[0].shape[-1])
        totals.setdefault(m.layer_idx, []).append(predictor_recall(m, x) * len(x))

    hooks = [m.register_forward_pre_hook(hook) for _, m in sparse_ffns(model)]
    device = next(model.parameters()).device
    try:
        for start in range(0, len(input_ids), batch_size):
            model(input_ids[start : start + batch_size].to(device))
    finally:
        for h in hooks:
            h.remove()
    n_tokens = input_ids.numel()
    return {layer: sum(v) / n_tokens for layer, v in sorted(totals.items())}
