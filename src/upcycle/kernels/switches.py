"""Which kernel path runs: one switch for every recipe's decode kernels, for A/B tests and benchmarks.

    with upcycle.kernels.use_kernels("reference"):           # no fast path: the pure-PyTorch reference
        ...
    with use_kernels("auto", layout="bundle", shadow_dots="float"):   # recipe options (see the recipe's runtime)

`mode`: auto (default) | reference (no fast path) | torch (torch-ops fallback only) | fused (C / Triton only).
Options are named values a recipe's runtime reads with `option(name, ...)`. Unset switches fall back to
environment variables, read on every call (UPCYCLE_KERNELS for the mode; each option names its own), so a
user can flip a path without code; code and benchmarks use `use_kernels`, which wins over the environment.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence

MODES = ("auto", "reference", "torch", "fused")

_mode: str | None = None
_options: dict[str, str] = {}


def kernel_mode() -> str:
    """The active mode: `use_kernels`/`set_kernel_mode` if set, else UPCYCLE_KERNELS, else 'auto'."""
    if _mode is not None:
        return _mode
    mode = os.environ.get("UPCYCLE_KERNELS", "auto").strip().lower() or "auto"
    return mode if mode in MODES else "auto"


def option(name: str, env: str, choices: Sequence[str], default: str) -> str:
    """A recipe option: set by `use_kernels(name=...)`, else environment variable `env`, else `default`."""
    if name in _options:
        return _options[name]
    value = os.environ.get(env, "").strip().lower()
    return value if value in choices else default


def set_kernel_mode(mode: str | None, **options: str | None) -> None:
    """Force a mode and options for this process; None: back to the environment."""
    global _mode
    if mode is not None and mode not in MODES:
        raise ValueError(f"kernel mode {mode!r} is not one of {MODES}")
    _mode = mode
    for k, v in options.items():
        if v is None:
            _options.pop(k, None)
        else:
            _options[k] = v


@contextlib.contextmanager
def use_kernels(mode: str | None = None, **options: str) -> Iterator[None]:
    """`with use_kernels('reference'):` runs the block on the given path; options as the recipe defines them."""
    global _mode
    previous = (_mode, dict(_options))
    set_kernel_mode(mode if mode is not None else _mode, **options)
    try:
        yield
    finally:
        _mode = previous[0]
        _options.clear()
        _options.update(previous[1])
