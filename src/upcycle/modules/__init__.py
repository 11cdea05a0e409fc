"""Plain nn.Modules that `upcycle.convert` swaps into a model."""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from upcycle.modules.bank_sparse import BankSparseSwiGLU, DenseSwiGLU
from upcycle.modules.predictors import LowRankPredictor, ShadowPredictor

__all__ = ["BankSparseSwiGLU", "DenseSwiGLU", "LowRankPredictor", "ShadowPredictor", "sparse_ffns"]


def sparse_ffns(model: nn.Module) -> Iterator[tuple[str, BankSparseSwiGLU]]:
    """(qualified name, module) of every bank-sparse FFN in `model`, in layer order."""
    for name, module in model.named_modules():
        if isinstance(module, BankSparseSwiGLU):
            yield name, module
