"""Activation checkpointing that replays the routing: the recomputed forward uses the forward's masks.

Under activation checkpointing the backward pass runs each decoder layer's forward a second time. Left
alone, a bank-sparse FFN would recompute its routing top-k there, and any difference from the first
forward (a near-tie of scores flipped by a non-deterministic GEMM, a predictor or `keep` changed between
forward and backward, a shadow re-quantised on other weights) would silently give gradients of a network
that never ran. `checkpoint_context_fn` (passed to torch.utils.checkpoint as `context_fn`) makes every
checkpointed region record each FFN's kept-channel mask in its first forward, bit-packed (d_ff / 8 bytes
per token and layer, an eighth of a bool mask), and hand it back in the recomputation instead of
recomputing it. Outside a checkpointed region nothing changes.

    model.gradient_checkpointing_enable({"use_reentrant": False, "context_fn": checkpoint_context_fn})

`upcycle.train` does this for any model whose modules define `checkpoint_context_fn` (BankSparseSwiGLU).
"""

from __future__ import annotations

import threading
from collections import defaultdict, deque

import torch
import torch.nn.functional as F
from torch import Tensor

_state = threading.local()


class RoutingStore:
    """The masks of one checkpointed region's forward, per module, in call order (packed bits)."""

    def __init__(self):
        self.masks: dict[int, deque[tuple[Tensor, torch.Size]]] = defaultdict(deque)
        self.recorded = self.replayed = 0

    def put(self, module, mask: Tensor) -> None:
        self.masks[id(module)].append((pack_bits(mask), mask.shape))
        self.recorded += 1

    def take(self, module) -> Tensor | None:
        queue = self.masks.get(id(module))
        if not queue:
            return None
        packed, shape = queue.popleft()
        self.replayed += 1
        return unpack_bits(packed, shape)

    @property
    def nbytes(self) -> int:
        return sum(p.numel() for q in self.masks.values() for p, _ in q)


class _Mode:
    """Record into (forward) or replay from (recomputation) `store` while open."""

    def __init__(self, mode: str, store: RoutingStore):
        self.mode, self.store = mode, store

    def __enter__(self) -> RoutingStore:
        self.previous = getattr(_state, "current", None)
        _state.current = (self.mode, self.store)
        return self.store

    def __exit__(self, *exc) -> None:
        _state.current = self.previous


def checkpoint_context_fn():
    """torch.utils.checkpoint's `context_fn`: (record during the forward, replay during the recomputation)."""
    store = RoutingStore()
    return _Mode("record", store), _Mode("replay", store)


def current() -> tuple[str, RoutingStore] | None:
    """("record" | "replay", store) inside a checkpointed region, else None."""
    return getattr(_state, "current", None)


def replayed_mask(module) -> Tensor | None:
    """In a recomputation: the mask `module` used in the forward (bool), else None."""
    state = current()
    if state is None or state[0] != "replay":
        return None
    return state[1].take(module)


def record_mask(module, mask: Tensor) -> None:
    """In a checkpointed forward: remember `module`'s mask for the recomputation."""
    state = current()
    if state is not None and state[0] == "record":
        state[1].put(module, mask)


def routed_mask(module, compute) -> Tensor:
    """The mask of a checkpointed region: the forward's when recomputing, else `compute()` (recorded)."""
    mask = replayed_mask(module)
    if mask is None:
        mask = compute()
        record_mask(module, mask)
    return mask


_SHIFTS: dict[torch.device, Tensor] = {}


def _shifts(device: torch.device) -> Tensor:
    if device not in _SHIFTS:
        _SHIFTS[device] = torch.arange(8, dtype=torch.uint8, device=device)
    return _SHIFTS[device]


def pack_bits(mask: Tensor) -> Tensor:
    """bool [..., n] -> uint8 [rows, ceil(n / 8)] (bit j of byte k: element 8k + j)."""
    flat = mask.reshape(-1, mask.shape[-1])
    pad = (-flat.shape[-1]) % 8
    if pad:
        flat = F.pad(flat, (0, pad))
    bits = flat.view(flat.shape[0], -1, 8).to(torch.uint8) << _shifts(mask.device)
    return bits.sum(-1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, shape: torch.Size) -> Tensor:
    """The inverse of pack_bits: the bool mask of `shape`."""
    n = shape[-1]
    bits = (packed.unsqueeze(-1) >> _shifts(packed.device)) & 1
    return bits.reshape(packed.shape[0], -1)[:, :n].bool().reshape(shape)
