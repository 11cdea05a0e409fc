"""Kernels: `reference` (pure PyTorch, the truth), fast decode paths (`cpu`: fused C kernel and a
torch-ops gather path; `triton`: GPU kernels, optional), and one `dispatch` the sparse FFN calls."""
