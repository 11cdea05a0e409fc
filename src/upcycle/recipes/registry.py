"""The recipe registry: config type -> recipe bundle, recipe name -> recipe bundle.

A recipe is more than a module swap (torchao's `quantize_` dispatches a config type to a handler;
torchtitan's model spec bundles what a family needs), so each recipe registers a `Recipe`:

- `config_cls` and `convert(model, config, **kw)`: the in-place conversion `upcycle.convert` dispatches to;
- `metadata(model)` / `from_metadata(model, section)`: the recipe's section of config.json["upcycle"],
  written from the live modules and turned back into modules on a freshly built model (`upcycle.load`);
- `to_dense(model)`: the dense function of the converted model (the distillation teacher), if it has one;
- `train_options_cls` and `train_hooks(model, options)`: what the generic trainer calls (`TrainHooks`);
- `baselines` / `apply_baseline`: the training-free methods users compare against, by name;
- `exporters`: other formats the recipe writes (`upcycle export --to NAME DIR OUT`: (model, out, tokenizer));
- `describe(model)` (eval) and `summarize(path, config, shapes)` + `format_summary` (`upcycle info`);
- `cli`: its flags for `upcycle convert --recipe NAME` and `upcycle train`.

Built-in recipes are imported by name on first use, so this module imports none of them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from upcycle import format as fmt

# Built-in recipes: name -> the package that registers it when imported.
BUILTIN = {"bank_sparse": "upcycle.recipes.bank_sparse", "moe": "upcycle.recipes.moe", "nm": "upcycle.recipes.nm"}


class TrainHooks:
    """What a recipe adds to the generic trainer. Every hook has a no-op default (a dense model uses this class).

    Called by `upcycle.train` in this order each step: `before_step` (schedules; returns metrics to log),
    `aux_weights` (which auxiliary losses count this step), `begin_aux` .. forward/backward of every
    micro-batch .. `end_aux`, optimizer step, `after_optimizer_step`, `step_metrics`; at the end `finalize`
    (on the model about to be saved) and `on_train_end`.
    """

    # extra optimizer groups: name -> {"lr_mult": float, "weight_decay": float}
    param_groups: Mapping[str, Mapping[str, float]] = {}
    # the run's optimizer steps (set by the trainer before any hook runs): schedules that default to a
    # fraction of the run read it
    total_steps: int | None = None

    def param_group(self, name: str) -> str | None:
        """The extra group parameter `name` joins, or None for the default decay / no-decay groups."""
        return None

    def optimizer(self, groups: list[dict], betas: tuple[float, float]) -> Any:
        """A recipe-specific optimizer over `groups` (torch param-group dicts), or None for AdamW."""
        return None

    def before_step(self, step: int) -> dict[str, float]:
        return {}

    def aux_weights(self, step: int) -> dict[str, float]:
        """Weights of the named auxiliary losses that modules record this step (see `Objective`)."""
        return {}

    def begin_aux(self, names: set[str]) -> None:
        """Start recording the auxiliary losses `names` (kept on for forward and backward: checkpointing replays)."""

    def end_aux(self) -> None:
        """Stop recording and drop the recorded losses."""

    def after_optimizer_step(self, step: int) -> None:
        pass

    def step_metrics(self) -> dict[str, float]:
        """Extra values for this step's metrics.jsonl row (nested dicts allowed: e.g. per-layer expert loads)."""
        return {}

    def finalize(self, model: nn.Module) -> None:
        """Change the trained model before it is saved as final (e.g. fold scales, hard-prune): in place."""

    def on_train_end(self, out: Path, metrics: list[dict]) -> None:
        """After the final save, on the main process: e.g. write plots next to metrics.jsonl."""

    def state_dict(self) -> dict:
        """JSON-ready state a resumed run needs (schedules are pure functions of the step: usually none)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


@dataclass(frozen=True)
class RecipeCLI:
    """A recipe's command-line flags. `add_*` get an argparse group; `*_from_args` read the parsed namespace."""

    add_convert_arguments: Callable[[Any], None]
    config_from_args: Callable[[Any], Any]  # (args) -> the recipe's config, checked before the model loads
    convert_from_args: Callable[[Any, Any, nn.Module, Any], None]  # (args, config, dense model, tokenizer): in place
    # train: flags mapped onto the recipe section of TrainConfig (key -> argparse kwargs incl. help)
    train_flags: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class Recipe:
    name: str
    summary: str
    config_cls: type
    convert: Callable[..., nn.Module]
    metadata: Callable[[nn.Module], dict]
    from_metadata: Callable[[nn.Module, dict], None]
    config_from_section: Callable[[dict, str], Any]  # (saved section, where) -> validated config
    to_dense: Callable[[nn.Module], nn.Module] | None = None
    train_options_cls: type | None = None
    train_hooks: Callable[[nn.Module, Any], TrainHooks] | None = None
    # train: build the recipe's config for an on-the-fly conversion from the TrainConfig recipe section
    train_convert_config: Callable[[dict], Any] | None = None
    baselines: Mapping[str, str] = field(default_factory=dict)  # name -> one-line description
    baseline_aliases: Mapping[str, str] = field(default_factory=dict)  # e.g. "oracle" -> "posthoc-magnitude"
    baselines_need_calibration: frozenset[str] = frozenset()
    # (model, name, options: dict, calibration_ids, progress=False): progress shows bars over the calibration
    apply_baseline: Callable[..., nn.Module] | None = None
    exporters: Mapping[str, Callable[..., Path]] = field(default_factory=dict)
    describe: Callable[[nn.Module], dict] | None = None
    # eval: a context manager `stats(model)` with `.summary()` measuring what the model computes while open
    # (default: upcycle.eval.stats.FFNStats, per-layer FFN density of SwiGLU FFNs)
    eval_stats: Callable[[nn.Module], Any] | None = None
    summarize: Callable[[Path, Any, dict], dict] | None = None  # (path, config, {tensor: (shape, bytes/elem)})
    format_summary: Callable[[dict], list[str]] | None = None
    cli: RecipeCLI | None = None
    # True: plain transformers loads the checkpoint as the same function (no re-classing, base model type)
    plain_loadable: bool = False


_registry: dict[str, Recipe] = {}


def register(recipe: Recipe) -> Recipe:
    if recipe.name in _registry and _registry[recipe.name] is not recipe:
        raise ValueError(f"a recipe named {recipe.name!r} is already registered")
    _registry[recipe.name] = recipe
    return recipe


def names() -> list[str]:
    return sorted(set(BUILTIN) | set(_registry))


def get(name: str) -> Recipe:
    """The recipe called `name`; ValueError listing the known ones."""
    if name not in _registry and name in BUILTIN:
        importlib.import_module(BUILTIN[name])
    if name not in _registry:
        raise ValueError(f"unknown upcycle recipe {name!r}: known recipes are {', '.join(names())}.")
    return _registry[name]


def load_all() -> list[Recipe]:
    return [get(n) for n in names()]


def for_config(config: Any) -> Recipe:
    """The recipe whose config class `config` is an instance of (what `upcycle.convert` dispatches on)."""
    for r in load_all():
        if type(config) is r.config_cls:
            return r
    known = ", ".join(f"{r.config_cls.__name__} ({r.name})" for r in load_all())
    raise TypeError(f"{type(config).__name__} is not a recipe config: pass one of {known}.")


def metadata_of(model: nn.Module) -> fmt.Metadata | None:
    return fmt.parse(getattr(getattr(model, "config", None), fmt.KEY, None), "model.config")


def for_model(model: nn.Module) -> Recipe | None:
    """The recipe a model was converted with (from `model.config.upcycle`), None for a dense model."""
    meta = metadata_of(model)
    return None if meta is None else get(meta.recipe)


def baselines() -> dict[str, tuple[Recipe, str]]:
    """Every registered baseline: name -> (recipe, description)."""
    out: dict[str, tuple[Recipe, str]] = {}
    for r in load_all():
        for name, text in r.baselines.items():
            out[name] = (r, text)
    return out
