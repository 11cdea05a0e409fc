"""MoEUpcycleConfig: the MoE recipe's typed config (what `upcycle.convert` dispatches on), validated up front.

Vocabulary used throughout the recipe (F = dense d_ff, d = hidden size):

* slices per copy ``G``: how many channel slices one copy of the dense FFN is cut into
  (copy: 1, granular: ``granularity``, split: ``num_experts + shared_experts``).
* expert size ``f = F / G``: intermediate size of every routed and shared expert.
* shared experts ``S``: the first S slices of the partition, always on with weight 1.
* routed experts per copy ``R = G - S`` and copies ``C = num_experts / R``: routed expert
  ``e = c * R + j`` holds slice ``S + j`` of copy ``c`` (the Megatron-Core expert order).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

from upcycle.fields import checked

Init = Literal["copy", "split", "granular"]
SplitBy = Literal["contiguous", "cluster"]
Router = Literal["softmax_topk", "topk_softmax"]
WeightScaling = Literal["exact", "cube_root", "none"]
RouterInit = Literal["random", "virtual_group", "calibrate"]

CHOICES = {
    "init": ("copy", "split", "granular"),
    "split_by": ("contiguous", "cluster"),
    "router": ("softmax_topk", "topk_softmax"),
    "weight_scaling": ("exact", "cube_root", "none"),
    "router_init": ("random", "virtual_group", "calibrate"),
}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass
class MoEUpcycleConfig:
    """How to turn each selected dense SwiGLU FFN into a dropless top-k MoE layer.

    Attributes:
        num_experts: routed experts per MoE layer (shared experts not included).
        top_k: routed experts per token.
        init: ``copy`` (every expert = the whole FFN), ``split`` (the FFN is partitioned into
            ``num_experts + shared_experts`` disjoint slices) or ``granular`` (``num_experts / R`` copies of
            the FFN, each cut into ``granularity`` slices; Megatron-Core "granular upcycling").
        split_by: how channels are grouped into slices: ``contiguous`` index ranges, or ``cluster``
            (balanced k-means on calibration activation profiles; needs calibration ids).
        granularity: slices per dense copy for ``init="granular"`` (must be 1 otherwise).
        shared_experts: always-on experts of the routed expert size, carved from the partition
            (their total size is shared_experts * expert size).
        router: ``softmax_topk`` (softmax over all experts, then top-k) or ``topk_softmax`` (softmax over
            the k best logits; always normalised, numerically identical to softmax_topk + renormalisation).
        norm_topk_prob: renormalise the k selected probabilities to sum to 1 (softmax_topk only).
        weight_scaling: how the activation-scale factor (see `activation_scale`) is put on the experts:
            ``exact`` = whole factor on down_proj (the expert output scales exactly), ``cube_root`` = factor**(1/3)
            on gate, up and down (the Megatron-Core recipe; not exact because silu(c*z) != c*silu(z)),
            ``none``.
        expert_scale: override of the activation-scale factor s (None: `activation_scale()`). For split inits
            with top_k < num_experts no factor is exact; s = top_k puts each selected expert at weight ~1 (the
            selected slices summed, MoEfication-style), which starts far closer to the dense model than the
            default s = R (unbiased only for a uniformly random router) when the router picks the strong slices.
        drop_upcycle: Drop-Upcycling ratio r: per routed expert, re-initialise round(r * f) intermediate
            channels from N(mean, std) of the dense matrices (0 = off).
        layers: which decoder layers become MoE: None = all, int k = every k-th (layer i with (i + 1) % k == 0,
            the Qwen2-MoE ``decoder_sparse_step`` rule), or an explicit list of indices.
        router_init: ``random`` (N(0, router_init_std)), ``virtual_group`` (C random rows, each repeated R times,
            so top-k picks whole dense copies at step 0) or ``calibrate`` (ridge regression of per-expert
            log activation norms on calibration inputs; needs calibration ids).
        router_init_std: std of random router rows.
        router_jitter: multiplicative uniform(1 - eps, 1 + eps) noise on the router input, training only.
        aux_loss_coef: weight of the load-balance loss in training (1.0 at perfect balance; Megatron: ~1e-2).
        z_loss_coef: weight of the router z-loss in training.
        seed: seed for every random choice of the upcycling (router rows, drop-upcycle, k-means).
    """

    num_experts: int = 8
    top_k: int = 2
    init: Init = "copy"
    split_by: SplitBy = "contiguous"
    granularity: int = 1
    shared_experts: int = 0
    router: Router = "softmax_topk"
    norm_topk_prob: bool = True
    weight_scaling: WeightScaling = "exact"
    expert_scale: float | None = None
    drop_upcycle: float = 0.0
    layers: None | int | list[int] = None
    router_init: RouterInit = "random"
    router_init_std: float = 0.02
    router_jitter: float = 0.0
    aux_loss_coef: float = 1e-2
    z_loss_coef: float = 1e-3
    seed: int = 0

    def __post_init__(self) -> None:
        for name, choices in CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {choices}.")
        self._check_counts()
        self._check_init()
        self._check_router()
        self._check_numbers()
        self._check_layers()

    def _check_counts(self) -> None:
        if not _is_int(self.num_experts) or self.num_experts < 1:
            raise ValueError(f"num_experts={self.num_experts} must be a positive int.")
        if not _is_int(self.top_k) or self.top_k < 1:
            raise ValueError(f"top_k={self.top_k} must be a positive int.")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k={self.top_k} > num_experts={self.num_experts}: set top_k <= num_experts.")
        if not _is_int(self.shared_experts) or self.shared_experts < 0:
            raise ValueError(f"shared_experts={self.shared_experts} must be an int >= 0.")
        if not _is_int(self.granularity) or self.granularity < 1:
            raise ValueError(f"granularity={self.granularity} must be a positive int.")
        if not _is_int(self.seed):
            raise ValueError(f"seed={self.seed!r} must be an int.")

    def _check_init(self) -> None:
        if self.init == "granular":
            if self.granularity < 2:
                raise ValueError("init='granular' needs granularity >= 2; granularity=1 is init='copy'.")
            if self.shared_experts >= self.granularity:
                raise ValueError(
                    f"shared_experts={self.shared_experts} leaves no routed slice of granularity={self.granularity}: "
                    f"use granularity >= shared_experts + 1."
                )
            r = self.experts_per_copy
            if self.num_experts % r:
                raise ValueError(
                    f"num_experts={self.num_experts} must be a multiple of granularity - shared_experts = {r} "
                    f"(routed experts per dense copy), e.g. num_experts={r * max(1, round(self.num_experts / r))}."
                )
        elif self.granularity != 1:
            raise ValueError(f"granularity={self.granularity} is only used by init='granular': set granularity=1.")
        if self.init == "copy" and self.shared_experts:
            raise ValueError(
                "init='copy' cannot carve shared experts out of the FFN (each copy is the whole FFN): "
                "use init='granular' with granularity > shared_experts, or init='split'."
            )
        if self.init == "copy" and self.split_by != "contiguous":
            raise ValueError("split_by only applies to init='split' or 'granular': use split_by='contiguous'.")

    def _check_router(self) -> None:
        if self.router == "topk_softmax" and not self.norm_topk_prob:
            raise ValueError(
                "router='topk_softmax' is always normalised (it equals softmax_topk with norm_topk_prob=True): "
                "set norm_topk_prob=True, or use router='softmax_topk' for unnormalised weights."
            )
        if self.router_init == "virtual_group" and self.top_k % self.experts_per_copy:
            raise ValueError(
                f"router_init='virtual_group' needs top_k to be a multiple of the {self.experts_per_copy} routed "
                f"experts per dense copy so whole copies are picked: set top_k to a multiple of "
                f"{self.experts_per_copy} or use router_init='random'."
            )
        if self.router_init == "calibrate" and self.init == "copy" and self.drop_upcycle == 0:
            raise ValueError(
                "router_init='calibrate' with init='copy' and drop_upcycle=0 has identical experts to tell apart: "
                "use router_init='random', or set drop_upcycle > 0."
            )

    def _check_numbers(self) -> None:
        for name in ("drop_upcycle", "router_jitter", "aux_loss_coef", "z_loss_coef", "router_init_std"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{name}={v!r} must be a finite number.")
        if not 0.0 <= self.drop_upcycle < 1.0:
            raise ValueError(f"drop_upcycle={self.drop_upcycle} must be in [0, 1): 0 turns it off, 0.5 is the "
                             "paper's.")
        if not 0.0 <= self.router_jitter < 1.0:
            raise ValueError(f"router_jitter={self.router_jitter} must be in [0, 1) (0: off; Switch used 1e-2).")
        for name in ("aux_loss_coef", "z_loss_coef", "router_init_std"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0.")
        s = self.expert_scale
        if s is not None and (isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s <= 0):
            raise ValueError(f"expert_scale={s!r} must be a finite number > 0 (or None: activation_scale()).")

    def _check_layers(self) -> None:
        layers = self.layers
        if layers is None:
            return
        if isinstance(layers, bool) or not isinstance(layers, (int, list, tuple)):
            raise ValueError(f"layers={layers!r} must be None, an int k (every k-th layer) or a list of indices.")
        if isinstance(layers, int):
            if layers < 1:
                raise ValueError(f"layers={layers} must be >= 1 (every k-th layer): use None for all layers.")
            return
        if not layers or any(not _is_int(i) or i < 0 for i in layers) or len(set(layers)) != len(layers):
            raise ValueError(f"layers={layers!r} must be a non-empty list of distinct layer indices >= 0.")
        self.layers = sorted(layers)

    # ----- derived quantities -------------------------------------------------------------------------------

    @property
    def slices_per_copy(self) -> int:
        """G: slices one dense copy is cut into."""
        if self.init == "copy":
            return 1
        if self.init == "granular":
            return self.granularity
        return self.num_experts + self.shared_experts

    @property
    def experts_per_copy(self) -> int:
        """R = G - S: routed experts taken from each dense copy."""
        return self.slices_per_copy - self.shared_experts

    @property
    def num_copies(self) -> int:
        """C: how many copies of the dense FFN the routed experts cover."""
        return self.num_experts // self.experts_per_copy

    @property
    def normalised(self) -> bool:
        """Whether the k routing weights of a token sum to 1."""
        return self.router == "topk_softmax" or self.norm_topk_prob

    @property
    def needs_calibration(self) -> bool:
        return self.split_by == "cluster" or self.router_init == "calibrate"

    def expert_size(self, d_ff: int) -> int:
        """f = d_ff / G; ValueError naming the fix if the split does not divide d_ff."""
        g = self.slices_per_copy
        if d_ff % g:
            what = "granularity" if self.init == "granular" else "num_experts + shared_experts"
            divisors = [v for v in range(2, min(d_ff, 256) + 1) if d_ff % v == 0]
            near = min(divisors, key=lambda v: abs(v - g)) if divisors else 1
            raise ValueError(f"d_ff={d_ff} is not divisible into {g} slices ({what}={g}): choose {what} dividing "
                             f"{d_ff} (e.g. {near}).")
        return d_ff // g

    def activation_scale(self) -> float:
        """Factor s that restores the dense output scale of the routed part at step 0.

        Normalised routing that picks whole copies gives each copy's R slices a total weight 1/R of the
        routed output, so s = R (exact with virtual-group routers; for split with k < R: unbiased only under a
        uniformly random router, see `expert_scale`). Without normalisation and with a uniform router each
        weight is 1/E and k/R copies are picked, so s = E * R / k (Megatron-Core's E_copies * G^2 / k for
        S = 0; exact only in expectation).
        """
        if self.expert_scale is not None:
            return float(self.expert_scale)
        r = self.experts_per_copy
        if self.normalised:
            return float(r)
        return self.num_experts * r / self.top_k

    def moe_layer_indices(self, num_layers: int) -> list[int]:
        """Decoder layer indices that become MoE, for a model with num_layers layers."""
        if self.layers is None:
            return list(range(num_layers))
        if isinstance(self.layers, int):
            return [i for i in range(num_layers) if (i + 1) % self.layers == 0]
        bad = [i for i in self.layers if i >= num_layers]
        if bad:
            raise ValueError(f"layers={self.layers} has indices {bad} >= num_layers={num_layers}: this model has "
                             f"layers 0..{num_layers - 1}.")
        return list(self.layers)

    def active_fraction(self) -> float:
        """Routed + shared FFN parameters a token uses, as a fraction of one dense FFN (router not counted)."""
        return (self.top_k + self.shared_experts) / self.slices_per_copy

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "config") -> MoEUpcycleConfig:
        """A config from plain (JSON) values, every value type- and range-checked; errors name `where`."""
        values = checked(cls, d, where)
        try:
            return cls(**values)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from e
