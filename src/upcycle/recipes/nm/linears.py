"""The targeted linears of an N:M model, and CAST's weight scales on them (shared by convert and training).

`nm_scale` [out, 2] is the learnable scale CAST trains per (row, block of columns); blocks are the two halves
of a row rounded to whole groups of m, so a scale multiplies whole N:M groups and never changes which weight
of a group is largest. A model rebuilt to receive a trained state dict (the FSDP2 final save) folds
`*.nm_scale` entries into the weights as they load (`register_fold_on_load`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from upcycle import hf
from upcycle.recipes.nm import oneshot, runtime
from upcycle.recipes.nm.config import NMSparseConfig
from upcycle.recipes.nm.masks import check_nm

SCALE = "nm_scale"  # CAST's weight-scaling parameter on a linear while it trains (see training.py)
SCALE_BLOCKS = 2


def targets(model: nn.Module, config: NMSparseConfig) -> dict[str, nn.Linear]:
    """{qualified name: nn.Linear} of the linears `config` targets; ValueError naming what is missing or has a
    width m does not divide."""
    prefix = _layers_prefix(model)
    found = {f"{prefix}{i}.{name}": lin for i, lins in oneshot.layer_targets(model, config.linear_names(),
                                                                             config.layers).items()
             for name, lin in lins.items()}
    if not found:
        raise ValueError(f"{type(model).__name__} has no nn.Linear named {', '.join(config.linear_names())} in its "
                         f"decoder layers (targets={config.targets}).")
    for name, lin in found.items():
        check_nm(config.n, config.m, lin.in_features, where=name)
    return found


def _layers_prefix(model: nn.Module) -> str:
    first = hf.decoder_layers(model)[0]
    name = next(n for n, mod in model.named_modules() if mod is first)
    return name[: -len("0")]  # "model.layers."


def scale_boundary(in_features: int, m: int = 4) -> int:
    """First column of the second scale block: half the row, rounded to whole groups of m."""
    return m * math.ceil(in_features // m / SCALE_BLOCKS) if in_features % m == 0 else in_features // SCALE_BLOCKS


def scale_matrix(scale: Tensor, in_features: int, dtype: torch.dtype, m: int = 4) -> Tensor:
    """[out, 2] block scales -> the [out, in] multiplier of the weight."""
    b = scale_boundary(in_features, m)
    counts = torch.tensor([b, in_features - b], device=scale.device)
    return scale.to(dtype).repeat_interleave(counts, dim=1, output_size=in_features)


def _fold_on_load(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """Load pre-hook: a `*.nm_scale` entry for a linear that has no scale parameter (a rebuilt model receiving a
    CAST model's trained state) is folded into that linear's weight entry."""
    for key in [k for k in state_dict if k.startswith(prefix) and k.endswith("." + SCALE)]:
        owner = key[len(prefix): -len(SCALE) - 1]
        try:
            lin = module.get_submodule(owner)
        except AttributeError:
            continue
        if SCALE in lin._parameters or f"{prefix}{owner}.weight" not in state_dict:
            continue
        scale = state_dict.pop(key)
        wkey = f"{prefix}{owner}.weight"
        w = state_dict[wkey]
        m = lin.__dict__.get(runtime._STATE, (2, 4))[1]
        state_dict[wkey] = w * scale_matrix(scale.to(w.device), w.shape[1], w.dtype, m)


def register_fold_on_load(model: nn.Module) -> None:
    if not getattr(model, "_upcycle_nm_fold_hook", False):
        model._register_load_state_dict_pre_hook(_fold_on_load, with_module=True)
        model._upcycle_nm_fold_hook = True


