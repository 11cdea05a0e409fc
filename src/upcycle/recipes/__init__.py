"""Recipes: the ways upcycle sparsifies a dense model, as peers on one pipeline (convert -> train -> eval -> export).

    bank_sparse/   predictor-gated bank-wise sparse SwiGLU (the flagship)
    moe/           dense -> MoE sparse upcycling (experts from the FFN, a router, HF Mixtral/Qwen2-MoE export)
    nm/            N:M (2:4) weight sparsity (one-shot magnitude/Wanda/SparseGPT, CAST-style training)
    layer_repair/  long-context diagnosis per layer and single-layer repair of a bank-sparse model

`upcycle.convert(model, config)` picks the recipe by the config's type; `upcycle.load` and `upcycle info`
by the recipe name saved in config.json["upcycle"]. What a recipe provides: see `registry.Recipe`.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from upcycle.recipes.registry import Recipe, RecipeCLI, TrainHooks, for_config, for_model, get, names, register

__all__ = ["Recipe", "RecipeCLI", "TrainHooks", "convert", "for_config", "for_model", "get", "names", "register",
           "to_dense"]


def convert(model: nn.Module, config: Any = None, **kwargs: Any) -> nn.Module:
    """Convert `model` in place with the recipe of `config`'s type (default: BankSparseConfig()); returns it.

    Keyword arguments go to the recipe (bank-sparse: `calibration_ids`, `progress`).
    """
    if config is None:
        from upcycle.recipes.bank_sparse import BankSparseConfig

        config = BankSparseConfig()
    return for_config(config).convert(model, config, **kwargs)


def to_dense(model: nn.Module) -> nn.Module:
    """The dense function of a converted model, in place (same weight tensors); a dense model is returned as is."""
    recipe = for_model(model)
    if recipe is None:
        return model
    if recipe.to_dense is None:
        raise ValueError(f"recipe {recipe.name!r} has no dense form of the converted model (its weights changed): "
                         "load the dense parent instead.")
    return recipe.to_dense(model)
