"""Recipes applied on top of each other (e.g. bank-sparse routing on an N:M model).

The registry tracks one recipe per model: config.json["upcycle"]["recipe"] is the last one applied, the one
whose modules `upcycle.load` rebuilds. A recipe converting an already converted model whose checkpoint is plain
loadable (its sparsity is in the weights themselves, like N:M zeros) records the earlier recipe's section
under the envelope's extra key "stacked" ({recipe name: section}); `format`'s extra keys survive every re-save.
The later recipe's train hooks are then composed with the earlier recipe's own (`compose`), so training keeps
both invariants: e.g. the N:M recipe, seeing itself stacked, keeps its zeros (mask read from them, re-applied
after every optimizer step).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from upcycle import format as fmt
from upcycle.recipes import registry
from upcycle.recipes.registry import TrainHooks

KEY = "stacked"


def extra_after(previous: fmt.Metadata | None, recipe: str) -> dict:
    """The extra keys of a new `recipe` envelope on a model whose envelope was `previous`."""
    if previous is None:
        return {}
    if previous.recipe == recipe:
        return dict(previous.extra)
    if not registry.get(previous.recipe).plain_loadable:
        raise ValueError(f"the model is converted with recipe {previous.recipe!r}, whose modules only it rebuilds: "
                         f"{recipe} cannot be applied on top of it; convert the dense model instead.")
    return {**previous.extra, KEY: {**previous.extra.get(KEY, {}), previous.recipe: previous.section}}


def sections(model: nn.Module) -> dict[str, dict]:
    """{recipe name: section} of the recipes applied before the model's own (oldest first)."""
    meta = registry.metadata_of(model)
    return dict(meta.extra.get(KEY, {})) if meta is not None else {}


def compose(model: nn.Module, hooks: TrainHooks) -> TrainHooks:
    """`hooks` (the model's own recipe's) together with those of every stacked recipe, or `hooks` alone."""
    stacked = [(name, registry.get(name)) for name in sections(model)]
    stacked = [(n, r.train_hooks(model, None)) for n, r in stacked if r.train_hooks is not None]
    return ComposedHooks([("own", hooks), *stacked]) if stacked else hooks


class ComposedHooks(TrainHooks):
    """Several recipes' hooks as one: the first entry's (the model's own recipe) run first."""

    def __init__(self, parts: list[tuple[str, TrainHooks]]):
        self.parts = parts
        self.param_groups = {}
        for _, h in parts:
            clash = set(self.param_groups) & set(h.param_groups)
            if clash:
                raise ValueError(f"stacked recipes both define optimizer groups {sorted(clash)}")
            self.param_groups.update(h.param_groups)

    def param_group(self, name: str) -> str | None:
        return next((g for _, h in self.parts if (g := h.param_group(name)) is not None), None)

    def optimizer(self, groups: list[dict], betas: tuple[float, float]) -> Any:
        made = [(n, o) for n, h in self.parts if (o := h.optimizer(groups, betas)) is not None]
        if len(made) > 1:
            raise ValueError(f"stacked recipes {[n for n, _ in made]} each bring their own optimizer")
        return made[0][1] if made else None

    def _merge(self, method: str, *args) -> dict:
        out: dict = {}
        for _, h in self.parts:
            out.update(getattr(h, method)(*args))
        return out

    def before_step(self, step: int) -> dict[str, float]:
        return self._merge("before_step", step)

    def aux_weights(self, step: int) -> dict[str, float]:
        return self._merge("aux_weights", step)

    def begin_aux(self, names: set[str]) -> None:
        for _, h in self.parts:
            h.begin_aux(names)

    def end_aux(self) -> None:
        for _, h in self.parts:
            h.end_aux()

    def after_optimizer_step(self, step: int) -> None:
        for _, h in self.parts:
            h.after_optimizer_step(step)

    def step_metrics(self) -> dict[str, float]:
        return self._merge("step_metrics")

    def finalize(self, model: nn.Module) -> None:
        for _, h in self.parts:
            h.finalize(model)

    def on_train_end(self, out: Path, metrics: list[dict]) -> None:
        for _, h in self.parts:
            h.on_train_end(out, metrics)

    def state_dict(self) -> dict:
        return {n: h.state_dict() for n, h in self.parts}

    def load_state_dict(self, state: dict) -> None:
        for n, h in self.parts:
            h.load_state_dict(state.get(n, {}))
