"""BankSparseConfig: the bank-sparse recipe's typed config (what `upcycle.convert` dispatches on)."""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Literal

from upcycle.fields import checked
from upcycle.recipes.bank_sparse.predictors import choose_predictor, shadow_bytes_fraction

GateMode = Literal["ste", "sigmoid"]
PredictorInit = Literal["svd", "calibrate", "random", "none"]
PredictorKind = Literal["auto", "lowrank", "shadow"]

GATE_MODES = ("ste", "sigmoid")
PREDICTOR_INITS = ("svd", "calibrate", "random", "none")
PREDICTOR_KINDS = ("auto", "lowrank", "shadow")

log = logging.getLogger(__name__)

# The predictor fit's default budget: intermediate_size // 4 steps per layer within these bounds. Real LLMs
# (intermediate_size >= 1200) get the 300 steps the fit was tuned with. A tiny layer's fit converges in far fewer
# (64 wide, d_ff 256: recall 0.56 after 100 steps, 0.58 after 300) while each step still costs the same fixed
# overhead: 300 steps per layer kept a 2-layer test model calibrating for minutes on a busy 2-core machine.
CALIBRATE_STEPS_MIN, CALIBRATE_STEPS_MAX = 50, 300


def default_calibrate_steps(intermediate_size: int) -> int:
    """The predictor-fit steps per layer when `calibrate_steps` is None: scaled with the layer's size."""
    return max(CALIBRATE_STEPS_MIN, min(CALIBRATE_STEPS_MAX, intermediate_size // 4))


@dataclass
class BankSparseConfig:
    """Predictor-gated bank-wise sparse SwiGLU.

    Every FFN's d_ff channels are cut into banks of `bank_size` consecutive channels; per token a
    predictor scores the channels and each bank keeps its top `keep`. `keep_per_layer` overrides
    `keep` for single layers (`keep == bank_size` keeps a layer dense). `layers=None` converts every
    SwiGLU FFN.

    The predictor is chosen by `predictor_budget`: the fraction of the dense FFN's 16-bit weight bytes
    it may read per token. `auto` takes a low-bit shadow of gate/up (`shadow`) when 2 bits fit, else a
    low-rank one (`lowrank`, hidden -> rank -> d_ff); `predictor_rank` / `shadow_bits` pin the size.
    A shadow carries a learned per-channel bias on its log-score (`shadow_bias`): the routing parameter
    that continual training optimises on the LM path.
    """

    bank_size: int = 64
    keep: int = 16
    predictor: PredictorKind = "auto"
    predictor_budget: float = 0.10
    predictor_rank: int | None = None  # lowrank; None: the largest rank within predictor_budget
    shadow_bits: int | None = None  # shadow; None: the most bits within predictor_budget
    shadow_group_size: int | None = None  # shadow; None: the smallest group within predictor_budget
    # shadow: a learned per-channel bias on the log-score (zero at conversion), trained by the LM loss through the
    # straight-through surrogate; False: the pure shadow, which has no parameter of its own
    shadow_bias: bool = True
    gate_mode: GateMode = "ste"
    predictor_init: PredictorInit = "svd"
    layers: list[int] | None = None
    keep_per_layer: dict[int, int] = field(default_factory=dict)
    # `mass`: keep per layer allocated from calibration data (convert(..., calibration_ids=)) under the same
    # total: layers whose |h| mass is spread over many channels keep more (see convert.allocate_keep);
    # explicit keep_per_layer entries stay as given
    keep_allocation: Literal["uniform", "mass"] = "uniform"
    # `ste`: temperature of the sigmoid surrogate used for the backward pass.
    ste_temperature: float = 1.0
    # `sigmoid`: gate = 2 * sigmoid(alpha * logits); alpha is learned, starts small so the start is near dense.
    sigmoid_scale_init: float = 0.1
    # `calibrate` init: optimisation steps per layer and learning rate of the predictor fit. None: from the layer
    # size (`default_calibrate_steps`); a calibrated checkpoint records the number that ran.
    calibrate_steps: int | None = None
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
        if self.keep_allocation not in ("uniform", "mass"):
            raise ValueError(f"keep_allocation={self.keep_allocation!r} is not one of ('uniform', 'mass').")
        if self.gate_mode not in GATE_MODES:
            raise ValueError(f"gate_mode={self.gate_mode!r} is not one of {GATE_MODES}.")
        if self.predictor_init not in PREDICTOR_INITS:
            raise ValueError(f"predictor_init={self.predictor_init!r} is not one of {PREDICTOR_INITS}.")
        if self.predictor_rank is not None and self.predictor_rank < 1:
            raise ValueError(f"predictor_rank must be >= 1, got {self.predictor_rank}.")
        if self.predictor not in PREDICTOR_KINDS:
            raise ValueError(f"predictor={self.predictor!r} is not one of {PREDICTOR_KINDS}.")
        if not 0 < self.predictor_budget <= 1:
            raise ValueError(f"predictor_budget={self.predictor_budget} must lie in (0, 1] (default 0.10).")
        if self.shadow_bits is not None and not 1 <= self.shadow_bits <= 8:
            raise ValueError(f"shadow_bits={self.shadow_bits} must lie in [1, 8].")
        if self.shadow_group_size is not None and self.shadow_group_size < 1:
            raise ValueError(f"shadow_group_size={self.shadow_group_size} must be >= 1.")
        if self.layers is not None and (any(i < 0 for i in self.layers) or len(set(self.layers)) != len(self.layers)):
            raise ValueError(f"layers={self.layers} must be distinct layer indices >= 0.")
        if self.layers is not None and not self.layers:
            raise ValueError("layers=[] converts nothing: list the layer indices to convert, or null for all.")
        if not (math.isfinite(self.ste_temperature) and self.ste_temperature > 0):
            raise ValueError(f"ste_temperature={self.ste_temperature} must be a finite number > 0.")
        if not (math.isfinite(self.sigmoid_scale_init) and math.isfinite(self.calibrate_lr) and self.calibrate_lr > 0):
            raise ValueError("sigmoid_scale_init and calibrate_lr must be finite (calibrate_lr > 0).")
        if self.calibrate_steps is not None and self.calibrate_steps < 0:
            raise ValueError(f"calibrate_steps={self.calibrate_steps} must be >= 0 (or None: from the layer size).")

    def keep_for(self, layer: int) -> int:
        return self.keep_per_layer.get(layer, self.keep)

    def calibrate_steps_for(self, intermediate_size: int) -> int:
        """Predictor-fit steps per layer: `calibrate_steps` when set, else `default_calibrate_steps`."""
        return default_calibrate_steps(intermediate_size) if self.calibrate_steps is None else self.calibrate_steps

    def predictor_spec(self, hidden_size: int, intermediate_size: int) -> dict:
        """{'predictor': 'lowrank', 'predictor_rank': r} or {'predictor': 'shadow', 'shadow_bits': b, ...}."""
        kind = self.predictor
        if kind == "auto" and self.predictor_rank is not None:
            kind = "lowrank"  # a pinned rank means a low-rank predictor
        if kind == "lowrank" and self.predictor_rank is not None:
            spec = {"predictor": "lowrank", "predictor_rank": self.predictor_rank}
        else:
            spec = choose_predictor(self.predictor_budget, hidden_size, intermediate_size, kind, self.shadow_bits)
        if spec["predictor"] == "shadow":
            if self.shadow_group_size is not None:
                if hidden_size % self.shadow_group_size:
                    raise ValueError(
                        f"shadow_group_size={self.shadow_group_size} must divide hidden_size={hidden_size}."
                    )
                spec["shadow_group_size"] = self.shadow_group_size
            # Priced on the final spec: pinned bits or a pinned group may exceed the budget.
            used = shadow_bytes_fraction(spec["shadow_bits"], spec["shadow_group_size"])
            if used > self.predictor_budget + 1e-9:
                log.warning("shadow_bits=%d with groups of %d reads %.3f of the dense FFN's bytes, over "
                            "predictor_budget=%s", spec["shadow_bits"], spec["shadow_group_size"], used,
                            self.predictor_budget)
            if self.gate_mode != "ste":
                raise ValueError("a shadow predictor scores |h|, not gate logits: use gate_mode='ste' with it, or "
                                 "predictor='lowrank' for the sigmoid gate.")
        return spec

    def to_dict(self) -> dict:
        d = asdict(self)
        d["keep_per_layer"] = {str(k): v for k, v in self.keep_per_layer.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict, where: str = "config") -> BankSparseConfig:
        """A config from plain (JSON) values, every value type- and range-checked; errors name `where`."""
        values = checked(cls, d, where)
        try:
            return cls(**values)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from e
