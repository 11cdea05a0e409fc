"""One-shot N:M baselines on a dense model, by name (`upcycle eval --model DENSE --baseline NAME`).

| name | rule | needs calibration |
|---|---|---|
| nm-magnitude | the 2 largest |w| of every 4 consecutive inputs | no |
| nm-wanda | the 2 largest |w| * ||x_j||_2 (input-channel norm), layers in sequence | yes (--calib-data) |
| nm-sparsegpt | SparseGPT 2:4 with OBS weight updates, layers in sequence | yes (--calib-data) |

2:4 on the FFN linears (gate/up/down_proj). They are the `convert` of this recipe with the method of that name,
applied in memory; `upcycle convert --recipe nm --method NAME` writes the same model as a checkpoint.
"""

from __future__ import annotations

from torch import Tensor, nn

from upcycle.recipes.nm.config import NMSparseConfig
from upcycle.recipes.nm.convert import convert

BASELINES = {
    "nm-magnitude": "2:4 FFN weights, one-shot: the 2 largest |w| of every 4 inputs",
    "nm-wanda": "2:4 FFN weights, one-shot Wanda: |w| * ||x|| on calibration data, layers in sequence",
    "nm-sparsegpt": "2:4 FFN weights, one-shot SparseGPT: OBS-updated weights, layers in sequence",
}
ALIASES = {"wanda": "nm-wanda", "sparsegpt": "nm-sparsegpt", "magnitude-2:4": "nm-magnitude"}
NEEDS_CALIBRATION = ("nm-wanda", "nm-sparsegpt")


def apply(model: nn.Module, name: str, config: NMSparseConfig | None = None, calibration_ids: Tensor | None = None,
          progress: bool = False) -> nn.Module:
    """Prune the dense `model` in place with baseline `name` (config: the pattern and targets; 2:4 FFN)."""
    name = ALIASES.get(name, name)
    if name not in BASELINES:
        raise ValueError(f"unknown N:M baseline {name!r}: choose one of {', '.join(BASELINES)}.")
    if name in NEEDS_CALIBRATION and calibration_ids is None:
        raise ValueError(f"baseline {name!r} needs calibration text: pass --calib-data PATH (disjoint from --data).")
    base = config or NMSparseConfig()
    cfg = NMSparseConfig(**{**base.to_dict(), "method": name.removeprefix("nm-")})
    convert(model, cfg, calibration_ids=calibration_ids, progress=progress)
    model.upcycle_baseline = name
    return model


def apply_options(model: nn.Module, name: str, options: dict, calibration_ids: Tensor | None = None,
                  progress: bool = False) -> nn.Module:
    """`apply` with plain options (those of `upcycle eval`: the bank-sparse keep / bank size do not apply)."""
    cfg = NMSparseConfig(n=options.get("n", 2), m=options.get("m", 4), targets=options.get("targets", ["ffn"]))
    return apply(model, name, cfg, calibration_ids, progress)
