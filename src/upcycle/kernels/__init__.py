"""Kernels: `reference` (pure PyTorch, the truth), fast paths, and one `dispatch`."""
