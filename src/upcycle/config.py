"""Typed recipe configs."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

GateMode = Literal["ste", "sigmoid"]
PredictorInit = Literal["svd", "calibrate", "random", "none"]

GATE_MODES = ("ste", "sigmoid")
PREDICTOR_INITS = ("svd", "calibrate", "random", "none")


@dataclass
class BankSparseConfig:
    """Predictor-gated bank-wise sparse SwiGLU.

    Every FFN's d_ff channels are cut into banks of `bank_size` consecutive channels; per token a
    low-rank predictor (hidden -> `predictor_rank` -> d_ff) scores the channels and each bank keeps
    its top `keep`. `keep_per_layer` overrides `keep` for single layers (`keep == bank_size` keeps a
    layer dense). `layers=None` converts every SwiGLU FFN.
    """

    bank_size: int = 64
    keep: int = 16
    predictor_rank: int | None = None  # None: hidden_size // 8, clamped to [16, 256]
    gate_mode: GateMode = "ste"
    predictor_init: PredictorInit = "svd"
    layers: list[int] | None = None
    keep_per_layer: dict[int, int] = field(default_factory=dict)
    # `ste`: temperature of the sigmoid surrogate used for the backward pass.
    ste_temperature: float = 1.0
    # `sigmoid`: gate = 2 * sigmoid(alpha * logits); alpha is learned, starts small so the start is near dense.
    sigmoid_scale_init: float = 0.1
    # `calibrate` init: optimisation steps and learning rate of the predictor fit.
    calibrate_steps: int = 300
    calibrate_lr: float = 1e-2

    def __post_init__(self) -> None:
        self.keep_per_layer = {int(k): int(v) for k, v in self.keep_per_layer.items()}
        if self.layers is not None:
            self.layers = [int(i) for i in self.layers]
        if self.bank_size < 1:
            raise ValueError(f"bank_size must be >= 1, got {self.bank_size}.")
        for where, keep in [("keep", self.keep)] + [
            (f"keep_per_layer[{i}]", k) for i, k in self.keep_per_layer.items()
        ]:
            if not 1 <= keep <= self.bank_size:
                raise ValueError(
                    f"{where}={keep} must lie in [1, bank_size={self.bank_size}]: "
                    f"set keep <= bank_size (e.g. keep={self.bank_size // 4} for 4x sparsity)."
                )
        if self.gate_mode not in GATE_MODES:
            raise ValueError(f"gate_mode={self.gate_mode!r} is not one of {GATE_MODES}.")
        if self.predictor_init not in PREDICTOR_INITS:
            raise ValueError(f"predictor_init={self.predictor_init!r} is not one of {PREDICTOR_INITS}.")
        if self.predictor_rank is not None and self.predictor_rank < 1:
            raise ValueError(f"predictor_rank must be >= 1, got {self.predictor_rank}.")

    def keep_for(self, layer: int) -> int:
        return self.keep_per_layer.get(layer, self.keep)

    def rank_for(self, hidden_size: int) -> int:
        if self.predictor_rank is not None:
            return self.predictor_rank
        return min(256, max(16, hidden_size // 8))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["keep_per_layer"] = {str(k): v for k, v in self.keep_per_layer.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> BankSparseConfig:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})
