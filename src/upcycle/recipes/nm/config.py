"""NMSparseConfig: the N:M recipe's typed config (what `upcycle.convert` dispatches on)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Literal

from upcycle.fields import checked

Method = Literal["magnitude", "wanda", "sparsegpt", "cast", "srste"]
METHODS = ("magnitude", "wanda", "sparsegpt", "cast", "srste")
ONE_SHOT = ("magnitude", "wanda", "sparsegpt")  # prune at convert time
TRAINED = ("cast", "srste")  # dense at convert time: sparsity-aware training, hard prune at its end
NEEDS_CALIBRATION = ("wanda", "sparsegpt")

# Target groups -> the nn.Linear attribute names of Llama / Qwen2 / Qwen3 / Mistral decoder layers.
TARGET_GROUPS = {"ffn": ("gate_proj", "up_proj", "down_proj"), "attention": ("q_proj", "k_proj", "v_proj", "o_proj")}
LINEAR_NAMES = TARGET_GROUPS["attention"] + TARGET_GROUPS["ffn"]  # forward order within a decoder layer


@dataclass
class NMSparseConfig:
    """Semi-structured N:M weight sparsity: in every group of `m` consecutive inputs of each output row of a
    targeted linear, at most `n` weights are nonzero (2:4 keeps 2 of every 4).

    `targets`: "ffn" (gate/up/down_proj), "attention" (q/k/v/o_proj) or single linear names ("down_proj").
    `method`: one-shot at convert time (`magnitude`: the n largest |w| per group; `wanda`: |w| * ||x_j||;
    `sparsegpt`: OBS-style pruning with weight updates, layers in sequence), or sparsity-aware training
    (`cast`, `srste`: the checkpoint stays dense until `upcycle train` hard-prunes it at the end).
    `wanda` / `sparsegpt` need calibration token ids: `calib_sequences` windows of `calib_seq_len` tokens
    (what `upcycle convert --data` cuts). `layers` None: every decoder layer.
    """

    n: int = 2
    m: int = 4
    targets: list[str] = field(default_factory=lambda: ["ffn"])
    method: Method = "magnitude"
    calib_sequences: int = 128
    calib_seq_len: int = 512
    layers: list[int] | None = None
    sparsegpt_blocksize: int = 128
    sparsegpt_damp: float = 0.01  # H += damp * mean(diag H) * I

    def __post_init__(self) -> None:
        for name in ("n", "m", "calib_sequences", "calib_seq_len", "sparsegpt_blocksize"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"{name} must be an integer, got {v!r}.")
        if self.n < 1 or self.m < 2:
            raise ValueError(f"N:M needs n >= 1 and m >= 2, got n={self.n}, m={self.m}.")
        if self.n >= self.m:
            raise ValueError(f"n={self.n} must be < m={self.m}: n is the number of weights KEPT in every group of m "
                             "consecutive inputs (2:4 keeps 2 of 4).")
        items = [self.targets] if isinstance(self.targets, str) else list(self.targets)
        self.targets = [t.strip() for item in items for t in str(item).split(",") if t.strip()]  # "ffn,attention"
        bad = [t for t in self.targets if t not in TARGET_GROUPS and t not in LINEAR_NAMES]
        if not self.targets or bad:
            raise ValueError(f"targets={self.targets}: choose from {', '.join(TARGET_GROUPS)} or linear names "
                             f"({', '.join(LINEAR_NAMES)}).")
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} is not one of {METHODS}.")
        if self.calib_sequences < 1 or self.calib_seq_len < 2:
            raise ValueError("calib_sequences must be >= 1 and calib_seq_len >= 2.")
        if self.sparsegpt_blocksize < 1:
            raise ValueError(f"sparsegpt_blocksize={self.sparsegpt_blocksize} must be >= 1 (rounded down to a "
                             "multiple of m when used).")
        if not (math.isfinite(self.sparsegpt_damp) and self.sparsegpt_damp > 0):
            raise ValueError(f"sparsegpt_damp={self.sparsegpt_damp} must be a finite number > 0.")
        if self.layers is not None:
            self.layers = [int(i) for i in self.layers]
            if any(i < 0 for i in self.layers) or len(set(self.layers)) != len(self.layers):
                raise ValueError(f"layers={self.layers} must be distinct layer indices >= 0.")

    @property
    def pattern(self) -> str:
        return f"{self.n}:{self.m}"

    def linear_names(self) -> tuple[str, ...]:
        """The targeted nn.Linear attribute names, in forward order."""
        wanted = {n for t in self.targets for n in TARGET_GROUPS.get(t, (t,))}
        return tuple(n for n in LINEAR_NAMES if n in wanted)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "config") -> NMSparseConfig:
        """A config from plain (JSON) values, every value type- and range-checked; errors name `where`."""
        values = checked(cls, d, where)
        try:
            return cls(**values)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from e
