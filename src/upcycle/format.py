"""The on-disk format: what upcycle writes under `"upcycle"` in a checkpoint's config.json.

    "upcycle": {"format_version": 1, "recipe": "bank_sparse", "bank_sparse": {...the recipe's config...},
                "source": "/path/of/the/dense/parent"}   # optional keys other tools recorded

The envelope (version, recipe name, where the recipe's section lives) is read and checked here; the
section itself belongs to the recipe, which validates it (see `upcycle.recipes`). Imports nothing of
the rest of upcycle, so `io`, the recipes and the CLI can all depend on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
KEY = "upcycle"  # the config.json key


class FormatError(ValueError):
    """The `upcycle` section of a config.json is malformed or from a newer upcycle."""


@dataclass(frozen=True)
class Metadata:
    recipe: str
    section: dict  # the recipe's own config, as saved
    extra: dict  # other keys of the envelope (e.g. "source"), kept on re-save
    format_version: int = FORMAT_VERSION


def make(recipe: str, section: dict, **extra: Any) -> dict:
    """The `upcycle` entry for config.json."""
    return {"format_version": FORMAT_VERSION, "recipe": recipe, recipe: section, **extra}


def parse(meta: Any, where: str | Path = "config.json") -> Metadata | None:
    """Check the envelope of a saved `upcycle` entry; None when there is none (a dense checkpoint)."""
    if meta is None:
        return None
    if not isinstance(meta, dict):
        raise FormatError(f"{where}: the 'upcycle' entry must be an object, got {type(meta).__name__}: "
                          "the checkpoint was edited or is corrupt; convert the dense model again.")
    version = meta.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise FormatError(f"{where}: upcycle.format_version={version!r} is not a non-negative integer.")
    if version > FORMAT_VERSION:
        raise FormatError(f"{where} was written by a newer upcycle (format {version} > {FORMAT_VERSION}): "
                          "upgrade upcycle.")
    recipe = meta.get("recipe")
    if not isinstance(recipe, str) or not recipe:
        raise FormatError(f"{where}: upcycle.recipe={recipe!r} is not a recipe name.")
    section = meta.get(recipe)
    if not isinstance(section, dict):
        raise FormatError(f"{where}: upcycle.{recipe} must be an object holding the recipe's config, got "
                          f"{type(section).__name__}.")
    extra = {k: v for k, v in meta.items() if k not in ("format_version", "recipe", recipe)}
    return Metadata(recipe, section, extra, version)
