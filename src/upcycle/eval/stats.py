"""Per-layer FFN statistics measured from what the model actually computes.

`FFNStats(model)` is a context manager: while it is open, every SwiGLU FFN of `model` (bank-sparse or
dense) is hooked and each forward adds to its layer's counters. Per layer, over every token position
the model ran on:

- `density`: fraction of the d_ff channels whose input to `down_proj` is nonzero (the channels
  actually used; a dense FFN measures 1.0).
- `bank_utilisation`: per bank, exp(entropy) of the distribution of selections over its channels,
  divided by bank_size, averaged over banks. 1.0: every channel of a bank is chosen equally often;
  keep/bank_size: the bank always uses the same `keep` channels (the rest are dead weight).
- `dead_channels`: fraction of channels never used on any token.
- `bank_load_max`: mean over tokens of the largest per-bank fraction of kept channels. The work of
  a bank-parallel kernel follows the fullest bank: equal to `density` for bank-balanced masks,
  larger for masks without the bank constraint (threshold, global top-k).
- `recall`: fraction of the oracle set (top `target_keep` of |h| per bank, h = act(g) * u computed
  densely) that the used channels cover; None for layers without a bank-sparse config (dense).
- `mass_kept`: sum of |h| over the used channels / sum of |h|, averaged over tokens.

An FFN module counts as bank-sparse when it has `bank_size` and `target_keep` (and, for forwards that skip
`down_proj` in a fused kernel, `kept_mask(x)`): the statistics need no recipe class.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from upcycle import hf
from upcycle.kernels.reference import bank_topk_mask


def _is_bank_sparse(m: nn.Module) -> bool:
    return hasattr(m, "bank_size") and hasattr(m, "target_keep")


@dataclass
class LayerCounters:
    layer: int
    d_ff: int
    bank_size: int
    target_keep: int | None  # None: no bank-sparse config (a dense FFN): recall is not defined
    sparse: bool
    tokens: int = 0
    kept: int = 0
    bank_load_max: float = 0.0
    recall: float = 0.0
    mass_kept: float = 0.0
    selected: Tensor | None = field(default=None, repr=False)  # [d_ff] int64: tokens that used each channel

    @torch.no_grad()
    def add(self, used: Tensor, h_abs: Tensor) -> None:
        """used [T, d_ff] bool (channels that reached down_proj), h_abs [T, d_ff] float |act(g) * u|."""
        t = used.shape[0]
        if self.selected is None:
            self.selected = torch.zeros(self.d_ff, dtype=torch.int64)
        self.tokens += t
        self.kept += int(used.sum())
        self.selected += used.sum(0).cpu()
        per_bank = used.reshape(t, -1, self.bank_size).sum(-1)
        self.bank_load_max += float(per_bank.amax(-1).sum()) / self.bank_size
        total = h_abs.sum(-1)
        self.mass_kept += float(((h_abs * used).sum(-1) / total.clamp_min(1e-30)).sum())
        if self.target_keep is not None:
            oracle = bank_topk_mask(h_abs, self.bank_size, self.target_keep)
            n_oracle = oracle.shape[-1] // self.bank_size * self.target_keep
            self.recall += float(((oracle & used).sum(-1).float() / n_oracle).sum())

    def summary(self) -> dict:
        n = max(self.tokens, 1)
        out = {"layer": self.layer, "sparse": self.sparse, "tokens": self.tokens,
               "density": self.kept / (n * self.d_ff)}
        if self.selected is not None and self.tokens:
            freq = self.selected.double().reshape(-1, self.bank_size)
            p = freq / freq.sum(-1, keepdim=True).clamp_min(1e-30)
            entropy = -(p * p.clamp_min(1e-30).log()).sum(-1)
            out["bank_utilisation"] = float((entropy.exp() / self.bank_size).mean())
            out["dead_channels"] = float((self.selected == 0).double().mean())
        else:
            out["bank_utilisation"] = out["dead_channels"] = None
        out["bank_load_max"] = self.bank_load_max / n
        out["recall"] = self.recall / n if self.target_keep is not None else None
        out["mass_kept"] = self.mass_kept / n
        out["bank_size"], out["target_keep"] = self.bank_size, self.target_keep
        return out


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


class FFNStats:
    """Hooks every SwiGLU FFN of `model` while open; `summary()` gives per-layer and overall stats.

    `bank_size` is used for the bank statistics of dense FFNs (sparse ones use their own); None:
    the bank size of the model's sparse FFNs, else 64 (or d_ff when 64 does not divide it).
    """

    def __init__(self, model: nn.Module, bank_size: int | None = None):
        self.model = model
        self.ffns = hf.glu_modules(model)
        if not self.ffns:
            raise ValueError(f"{type(model).__name__} has no SwiGLU FFN (gate_proj, up_proj, down_proj) to measure.")
        sparse_banks = [m.bank_size for _, _, m in self.ffns if _is_bank_sparse(m)]
        self.default_bank = bank_size or (sparse_banks[0] if sparse_banks else 64)
        self.counters: list[LayerCounters] = []
        self._hooks: list = []
        self._pending: dict[int, tuple[Tensor, Tensor | None]] = {}
        self.reset()

    def reset(self) -> None:
        self.counters = []
        for _, idx, m in self.ffns:
            d_ff = m.gate_proj.out_features
            sparse = _is_bank_sparse(m)
            bank = m.bank_size if sparse else (self.default_bank if d_ff % self.default_bank == 0 else d_ff)
            self.counters.append(LayerCounters(idx, d_ff, bank, m.target_keep if sparse else None, sparse))

    def __enter__(self) -> FFNStats:
        for j, (_, _, m) in enumerate(self.ffns):
            self._hooks.append(m.register_forward_pre_hook(lambda mod, args, j=j: self._start(j, args[0])))
            # A module that can say its mask (bank-sparse, no custom mask_fn) gets no hook on its linears: one there
            # would switch its decode steps off the fused kernel, so the measured model would not be the one
            # `generate` runs.
            if not hasattr(m, "kept_mask") or getattr(m, "mask_fn", None) is not None:
                self._hooks.append(m.down_proj.register_forward_pre_hook(
                    lambda mod, args, j=j: self._used(j, args[0])))
            self._hooks.append(m.register_forward_hook(lambda mod, args, out, j=j: self._finish(j, mod)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._pending = {}

    def _start(self, j: int, x: Tensor) -> None:
        self._pending[j] = (x.detach(), None)

    def _used(self, j: int, hin: Tensor) -> None:
        if j in self._pending:
            self._pending[j] = (self._pending[j][0], hin.detach() != 0)

    @torch.no_grad()
    def _finish(self, j: int, m: nn.Module) -> None:
        x, used = self._pending.pop(j, (None, None))
        if x is None:
            return
        x = x.reshape(-1, x.shape[-1])
        if used is None:  # the module's own mask (what its forward or fused kernel kept)
            if not hasattr(m, "kept_mask"):
                return
            used = m.kept_mask(x)
        h_abs = (m.act_fn(m.gate_proj(x)) * m.up_proj(x)).abs().float()
        self.counters[j].add(used.reshape(-1, used.shape[-1]), h_abs)

    def summary(self) -> dict:
        """{"ffn_density", "recall", "mass_kept", "bank_utilisation", "bank_load_max", "tokens", "layers": [...]}.

        Overall `ffn_density` is channel-weighted over all FFN layers (dense ones count at their
        measured density); the other overall figures are means over layers (recall: over layers
        that have a bank-sparse config; None if none has).
        """
        layers = [c.summary() for c in self.counters]
        channels = sum(c.d_ff * c.tokens for c in self.counters)
        return {
            "ffn_density": sum(c.kept for c in self.counters) / channels if channels else None,
            "recall": _mean([s["recall"] for s in layers]),
            "mass_kept": _mean([s["mass_kept"] for s in layers]),
            "bank_utilisation": _mean([s["bank_utilisation"] for s in layers]),
            "bank_load_max": _mean([s["bank_load_max"] for s in layers]),
            "tokens": self.counters[0].tokens if self.counters else 0,
            "layers": layers,
        }


def stats_for(model: nn.Module):
    """The statistics context of `model`'s recipe (its `eval_stats`), else FFNStats: what `evaluate` measures."""
    from upcycle.recipes import registry

    recipe = registry.for_model(model)
    if recipe is not None and recipe.eval_stats is not None:
        return recipe.eval_stats(model)
    return FFNStats(model)
