"""Channel scorers of the bank-sparse FFN: a learned low-rank predictor and a low-bit shadow of gate/up.

Both map x [..., d] to scores [..., d_ff]; only the order of the scores inside each bank matters.
`lowrank_bytes_fraction` / `shadow_bytes_fraction`: what a scorer reads per token as a fraction of the
dense FFN's 16-bit weight bytes (3 * d * d_ff * 2), the price the `predictor_budget` knob caps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from upcycle.kernels.reference import clip_search, shadow_dequantize, shadow_quantize

# Per quantisation group a shadow stores a 16-bit scale and a 16-bit zero point.
SHADOW_GROUP_OVERHEAD_BITS = 32


class LowRankPredictor(nn.Module):
    """Channel routing logits B(A(x)): [..., d] -> [..., d_ff]."""

    kind = "lowrank"

    def __init__(self, hidden_size: int, intermediate_size: int, rank: int, dtype=None, device=None):
        super().__init__()
        self.in_proj = nn.Linear(hidden_size, rank, bias=False, dtype=dtype, device=device)
        self.out_proj = nn.Linear(rank, intermediate_size, bias=True, dtype=dtype, device=device)
        nn.init.zeros_(self.out_proj.bias)

    @property
    def rank(self) -> int:
        return self.in_proj.out_features

    def forward(self, x: Tensor) -> Tensor:
        return self.out_proj(self.in_proj(x))


def lowrank_bytes_fraction(hidden_size: int, intermediate_size: int, rank: int) -> float:
    return (rank * (hidden_size + intermediate_size) + intermediate_size) / (3 * hidden_size * intermediate_size)


def shadow_bytes_fraction(bits: int, group_size: int) -> float:
    """A shadow of gate and up (2 of the FFN's 3 matrices) at `bits` per weight plus group overhead."""
    return 2 * (bits + SHADOW_GROUP_OVERHEAD_BITS / group_size) / (3 * 16)


def fake_quantize(w: Tensor, bits: int, group_size: int, factors: Tensor | None = None) -> Tensor:
    """w through a `bits`-bit shadow and back (see kernels.reference.shadow_quantize), in w's dtype."""
    return shadow_dequantize(*shadow_quantize(w, bits, group_size, factors)).to(w.dtype)


def choose_predictor(budget: float, hidden_size: int, intermediate_size: int, kind: str = "auto",
                     bits: int | None = None) -> dict:
    """The best scorer that reads at most `budget` of the dense FFN's 16-bit bytes per token.

    `auto`: a shadow at the most bits that fit (smallest quantisation group that fits, preferring
    multiples of 32), else the largest low-rank predictor that fits. Measured on SmolLM2-135M after
    200 steps (bench/routing.py), a shadow beats a low-rank predictor of the same bytes at both budgets
    where the two compete: 2-bit (0.10) by far, and at 0.05 a 1-bit shadow reaches 2.4x the dense
    control's WikiText-2 ppl where rank 62 stays at 6.5x.
    """
    groups = [g for g in range(32, hidden_size + 1) if hidden_size % g == 0] or [hidden_size]
    if kind in ("auto", "shadow"):
        for b in [bits] if bits else range(8, 0, -1):
            fits = [g for g in groups if shadow_bytes_fraction(b, g) <= budget + 1e-9]
            if fits:
                # Groups of a multiple of 32 inputs are whole vector steps in the kernels: the CPU kernel
                # scored a Qwen2.5-0.5B-shaped FFN 1.4x (2-bit, 128 vs 112) and 1.7x (4-bit, 64 vs 56)
                # faster; the quantisation barely notices (SmolLM2 4-bit, 64 vs 48: recall 0.927 vs 0.932).
                aligned = [g for g in fits if g % 32 == 0]
                return {"predictor": "shadow", "shadow_bits": b, "shadow_group_size": (aligned or fits)[0]}
            if bits:  # the user fixed the bits: take the largest group, over budget if need be (the caller warns)
                return {"predictor": "shadow", "shadow_bits": b, "shadow_group_size": groups[-1]}
        if kind == "shadow":
            raise ValueError(f"predictor_budget={budget} is below a 1-bit shadow's "
                             f"{shadow_bytes_fraction(1, groups[-1]):.3f}: raise the budget or use a low-rank "
                             "predictor (predictor='lowrank').")
    # lowrank_bytes_fraction solved for the rank
    rank = int((budget * 3 * hidden_size * intermediate_size - intermediate_size) / (hidden_size + intermediate_size))
    if rank < 1:
        raise ValueError(f"predictor_budget={budget} fits no predictor for hidden={hidden_size}, d_ff="
                         f"{intermediate_size}: raise it (rank 1 needs "
                         f"{lowrank_bytes_fraction(hidden_size, intermediate_size, 1):.4f}).")
    return {"predictor": "lowrank", "predictor_rank": rank}


class ShadowPredictor(nn.Module):
    """Scores channels by |silu(x Gq^T) * (x Uq^T)|: the oracle's |h| computed from a low-bit copy of gate and up.

    The shadow is a function of the live FFN weights, not a separate parameter: it is re-quantised
    whenever they change (cached on their version counters), so during continual training it tracks
    the FFN as it learns, and a checkpoint needs no copy of it (`bits` and `group_size` live in the
    config). Ranking SwiGLU channels needs both gate and up; low rank loses that, a low-bit copy
    does not (4-bit recall of the oracle mask ~0.9 on SmolLM2-135M, see bench/real_model.py).

    `learned_bias`: a per-channel bias on the log-score, `log|h_q| + bias` (zero at conversion, so the
    ranking starts as the pure shadow's), trained by the LM loss through the straight-through surrogate:
    the routing module's parameter on the LM path (`predictor.bias`, d_ff values per layer). Decode
    kernels apply it as the channel weight exp(bias) on |h_q|, the same ranking.

    Training re-quantises with each group's clipping factor cached from the last full search (one pass
    instead of one per grid point, `REFIT_EVERY` forwards between searches); no-grad forwards (evaluation,
    decode) always use the exact search, as the decode kernels' packed shadow does.
    """

    kind = "shadow"
    REFIT_EVERY = 32  # training forwards between full clipping searches

    def __init__(self, gate_proj: nn.Linear, up_proj: nn.Linear, bits: int, group_size: int,
                 learned_bias: bool = False):
        super().__init__()
        if not 1 <= bits <= 8:
            raise ValueError(f"shadow bits must lie in [1, 8], got {bits}.")
        self.bits, self.group_size = bits, group_size
        # A plain tuple: the FFN's linears stay owned (and saved, sharded) by the FFN module alone.
        self._sources = (gate_proj, up_proj)
        self._cache: tuple | None = None
        self._factors: tuple[Tensor, Tensor] | None = None  # cached clip factors of gate and up
        self._since_search = 0
        w = gate_proj.weight
        if learned_bias:
            self.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device))
        else:
            self.register_parameter("bias", None)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, group_size={self.group_size}" + (", learned bias" if self.bias is not None else "")

    def shadow_weights(self, exact: bool | None = None) -> tuple[Tensor, Tensor]:
        """The fake-quantised gate and up weights; `exact` (default: when autograd is off) forces the full search."""
        exact = not torch.is_grad_enabled() if exact is None else exact
        gate, up = (lin.weight for lin in self._sources)
        key = tuple((w.data_ptr(), w._version, w.dtype, w.device) for w in (gate, up))
        if self._cache is not None and self._cache[0] == key and (self._cache[1] or not exact):
            return self._cache[2], self._cache[3]
        with torch.no_grad():
            if exact or self._factors is None or self._since_search >= self.REFIT_EVERY:
                self._factors = (clip_search(gate, self.bits, self.group_size),
                                 clip_search(up, self.bits, self.group_size))
                self._since_search, searched = 0, True
            else:
                self._since_search, searched = self._since_search + 1, False
            gq, uq = (fake_quantize(w, self.bits, self.group_size, f) for w, f in zip((gate, up), self._factors,
                                                                                     strict=True))
        self._cache = (key, searched, gq, uq)
        return gq, uq

    def resume_state(self) -> dict[str, Tensor]:
        """The training-time refit cache (the last full search's clipping factors, forwards since), for checkpoints.

        Derived, so not in the model's state_dict (a saved model needs none of it), but training re-quantises
        with it: a run resumed without it would re-search at once and part from the uninterrupted run.
        """
        if self._factors is None:
            self.shadow_weights(exact=True)
        return {"gate_factors": self._factors[0], "up_factors": self._factors[1],
                "since_search": torch.tensor(self._since_search)}

    def load_resume_state(self, state: dict[str, Tensor]) -> None:
        self._factors = (state["gate_factors"], state["up_factors"])
        self._since_search = int(state["since_search"])
        self._cache = None

    def magnitudes(self, x: Tensor) -> Tensor:
        """|h_q| = |silu(x Gq^T) * (x Uq^T)| (no gradient: the shadow follows the FFN weights, it is not trained)."""
        gq, uq = self.shadow_weights()
        gate, up = self._sources
        with torch.no_grad():
            return (F.silu(F.linear(x, gq, gate.bias)) * F.linear(x, uq, up.bias)).abs()

    def channel_scale(self) -> Tensor | None:
        """exp(bias) in float32: the learned bias as a multiplicative channel weight on |h_q| (decode kernels)."""
        return None if self.bias is None else self.bias.detach().float().exp()

    def forward(self, x: Tensor) -> Tensor:
        """Routing scores [..., d_ff]: |h_q|, or with a learned bias log|h_q| + bias (the bias carries the gradient)."""
        mag = self.magnitudes(x)
        if self.bias is None:
            return mag
        return mag.float().clamp_min_(1e-30).log_() + self.bias.float()

    def __getstate__(self):  # deepcopy / pickle: the cache is rebuilt on demand
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state["_cache"] = None
        return state
