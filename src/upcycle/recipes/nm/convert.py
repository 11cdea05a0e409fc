"""N:M conversion: find the targeted linears, prune them one-shot (or leave them dense for sparsity-aware
training), the metadata round trip, and the exactness check.

The mask lives in the checkpoint as **exact zeros** in the ordinary dense weight tensors: a targeted weight
is N:M when every group of m consecutive inputs of every row holds at most n nonzeros, and its mask is read
back as the n largest |w| of each group (`masks.magnitude_mask`, which on an exact N:M weight is the set of
its nonzeros plus, in a group with fewer than n, the lowest-index zeros). Safetensors stores the values bit
for bit, so exactness survives save/load, and plain transformers loads the same function (no re-classing,
the base model type is kept). `metadata` records the config and whether every target is exact ("pruned").
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from upcycle import format as fmt
from upcycle import hf_models
from upcycle.recipes import registry
from upcycle.recipes.nm import oneshot, runtime
from upcycle.recipes.nm.config import NEEDS_CALIBRATION, ONE_SHOT, NMSparseConfig
from upcycle.recipes.nm.linears import SCALE, register_fold_on_load, scale_matrix, targets
from upcycle.recipes.nm.masks import is_nm, nonzeros_per_group

log = logging.getLogger(__name__)

NAME = "nm"
MASK_STORAGE = "exact zeros in the dense weights (mask = the n largest |w| of every group of m inputs)"


def convert(
    model: nn.Module,
    config: NMSparseConfig | None = None,
    calibration_ids: Tensor | None = None,
    progress: bool = True,
    errors: dict | None = None,
    batch_size: int = 8,
) -> nn.Module:
    """Make every targeted linear of `model` N:M in place (one-shot methods) or mark it for sparsity-aware
    training (`cast`, `srste`: the weights stay dense until training hard-prunes them); returns `model`.

    `calibration_ids` [N, L] token ids: needed by `wanda` and `sparsegpt`. `errors`: a dict filled with each
    pruned linear's reconstruction error ||X (W - W_s)^T||^2 / ||X W^T||^2 on its calibration inputs.
    """
    config = config or NMSparseConfig()
    previous = registry.metadata_of(model)
    if previous is not None:
        if previous.recipe == NAME:
            raise ValueError(f"{type(model).__name__} is already converted with the N:M recipe "
                             f"({previous.section.get('n')}:{previous.section.get('m')}): convert the dense model.")
        raise ValueError(f"{type(model).__name__} is converted with recipe {previous.recipe!r}: apply the N:M recipe "
                         f"to the dense model first, then {previous.recipe} (stacked checkpoints keep the N:M "
                         "section under upcycle.stacked).")
    found = targets(model, config)
    if config.method in NEEDS_CALIBRATION and calibration_ids is None:
        raise ValueError(f"method {config.method!r} needs calibration data: pass calibration_ids (token ids "
                         f"[N, L]) to convert, or --data FILE to `upcycle convert`; or use method='magnitude'.")
    if config.method in ONE_SHOT:
        ids = None if calibration_ids is None else calibration_ids[: config.calib_sequences]
        if ids is not None and config.method in NEEDS_CALIBRATION:
            log.info("N:M %s calibration: %d x %d tokens", config.method, ids.shape[0], ids.shape[1])
        blocksize = max(config.m, config.sparsegpt_blocksize // config.m * config.m)
        was_training = model.training
        model.eval()
        try:
            errs = oneshot.prune(model, oneshot.layer_targets(model, config.linear_names(), config.layers),
                                 config.method, config.n, config.m, ids, batch_size=batch_size,
                                 blocksize=blocksize, damp=config.sparsegpt_damp,
                                 return_errors=errors is not None and ids is not None, progress=progress)
        finally:
            model.train(was_training)
        if errors is not None:
            errors.update(errs)
        bad = [n for n, lin in found.items() if not is_nm(lin.weight, config.n, config.m)]
        if bad:  # cannot happen unless a method is broken: never save a checkpoint that claims what it is not
            raise RuntimeError(f"N:M convert left {len(bad)} linears not {config.pattern} (e.g. {bad[0]})")
    if hasattr(model, "config"):
        hf_models.own_config(model)  # the metadata goes on the model's own config, never a shared one
        setattr(model.config, fmt.KEY, fmt.make(NAME, metadata(model, config)))
    attach(model, config)
    return model


def attach(model: nn.Module, config: NMSparseConfig) -> None:
    """What a converted model carries in memory (never in its state_dict): the decode runtime on its 2:4
    linears, and the load hook that folds CAST's weight scales (see linears.register_fold_on_load)."""
    runtime.install(model, targets(model, config), config.n, config.m)
    register_fold_on_load(model)


def saved_config(model: nn.Module) -> NMSparseConfig:
    meta = registry.metadata_of(model)
    if meta is None or meta.recipe != NAME:
        raise ValueError(f"{type(model).__name__} is not an N:M model (no upcycle.{NAME} metadata).")
    return config_from_section(meta.section, "model.config")


def exactness(model: nn.Module, config: NMSparseConfig | None = None) -> dict:
    """{"exact": every target is N:M, "linears", "exact_linears", "weight_density": nonzero fraction of the
    targeted weights, "max_nonzeros_per_group", "not_exact": [names]}."""
    config = config or saved_config(model)
    nz = total = exact = 0
    worst = 0
    not_exact = []
    found = targets(model, config)
    with torch.no_grad():
        for name, lin in found.items():
            w = _weight(lin)
            per_group = nonzeros_per_group(w, config.m)
            worst = max(worst, int(per_group.max()))
            nz += int(per_group.sum())
            total += w.numel()
            if int(per_group.max()) <= config.n:
                exact += 1
            else:
                not_exact.append(name)
    return {"pattern": config.pattern, "exact": not not_exact, "linears": len(found), "exact_linears": exact,
            "weight_density": nz / max(1, total), "max_nonzeros_per_group": worst, "not_exact": not_exact}


def _weight(lin: nn.Linear) -> Tensor:
    """The linear's effective weight (a training-time weight scale folded in)."""
    w = lin.weight.detach()
    scale = getattr(lin, SCALE, None)
    if scale is not None:
        w = w * scale_matrix(scale.detach(), lin.in_features, w.dtype)
    return w


def metadata(model: nn.Module, config: NMSparseConfig | None = None) -> dict:
    """The recipe's section of config.json["upcycle"]: the config, how the mask is stored, and whether every
    targeted weight is exactly N:M now ("pruned": false for a cast/srste model before training)."""
    config = config or saved_config(model)
    d = config.to_dict()
    ex = exactness(model, config)
    d.update(pruned=ex["exact"], linears=ex["linears"], mask=MASK_STORAGE)
    return d


def config_from_section(section: dict, where: str = "config.json") -> NMSparseConfig:
    return NMSparseConfig.from_dict(section, where=where)


def from_metadata(model: nn.Module, section: dict) -> None:
    """On a freshly built model (before its weights load): check the targets fit, attach the runtime."""
    config = config_from_section(section)
    hf_models.own_config(model)
    attach(model, config)
