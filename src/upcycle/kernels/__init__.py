"""Kernels, tensor in and tensor out (no module classes here): `reference` (pure PyTorch, the truth every
fast kernel is tested against), `packing` (the shadow predictor's packed codes), `cpu` (C kernels built
on first use, and torch-ops fallbacks), `triton` (GPU, optional), and `switches` (`use_kernels`: which path
runs). Which module calls which kernel is decided by each recipe's runtime (e.g. recipes/bank_sparse/runtime.py)."""

from upcycle.kernels.switches import kernel_mode, set_kernel_mode, use_kernels

__all__ = ["kernel_mode", "set_kernel_mode", "use_kernels"]
