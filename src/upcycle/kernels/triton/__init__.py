"""Triton (GPU) decode kernels: optional, imported only when triton is installed and a GPU is in use."""

from __future__ import annotations

import functools
import importlib.util

import torch
from torch import Tensor

from upcycle.kernels.packing import shadow_decode_op


@functools.lru_cache(maxsize=1)
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def available() -> bool:
    """True when the Triton path can run here: triton importable and a CUDA device present."""
    return triton_installed() and torch.cuda.is_available()


def sparse_decode(x: Tensor, *args, **kwargs) -> Tensor:
    """See `upcycle.kernels.triton.decode.sparse_decode` (imported lazily: triton is optional)."""
    from upcycle.kernels.triton.decode import sparse_decode as impl

    return impl(x, *args, **kwargs)


def shadow_sparse_decode(x: Tensor, *args, **kwargs) -> Tensor:
    """See `upcycle.kernels.triton.decode.shadow_sparse_decode`."""
    from upcycle.kernels.triton.decode import shadow_sparse_decode as impl

    return impl(x, *args, **kwargs)


# torch.compile and CUDA graphs see the four launches as one opaque op with a fixed-shape output.
@torch.library.custom_op("upcycle::bank_sparse_decode_triton", mutates_args=())
def sparse_decode_op(
    x: Tensor,
    w_gate: Tensor,
    w_up: Tensor,
    w_down_t: Tensor,
    w_in: Tensor,
    w_out: Tensor,
    b_out: Tensor | None,
    bank_size: int,
    keep: int,
    gate_scale: Tensor | None,
) -> Tensor:
    return sparse_decode(x, w_gate, w_up, w_down_t, w_in, w_out, b_out, bank_size, keep, gate_scale)


@sparse_decode_op.register_fake
def _(x, w_gate, w_up, w_down_t, w_in, w_out, b_out, bank_size, keep, gate_scale):
    return x.new_empty(x.shape[0], w_down_t.shape[1])


shadow_sparse_decode_op = shadow_decode_op("bank_sparse_shadow_decode_triton", shadow_sparse_decode)
