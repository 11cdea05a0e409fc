"""transformers classes for converted models, registered with the Auto classes (no remote code).

A converted model whose plain-transformers load would compute another function (a bank-sparse FFN
loaded as its dense parent, a predictor's weights ignored) is re-classed to `Upcycle<Arch>ForCausalLM`,
a subclass of its own HF class, with `model_type: "upcycle_<base type>"` in config.json. So:

- after `import upcycle`, `AutoModelForCausalLM.from_pretrained(DIR)` loads the converted model itself:
  the subclass's `__init__` rebuilds the recipe's modules from `config.upcycle` before the weights load;
- without upcycle, transformers refuses the unknown model type instead of loading a different model;
- `model.save_pretrained(DIR)` is the subclass's override: it refreshes the recipe's metadata from the
  live modules (e.g. a keep changed by a schedule) and writes atomically (temp dir, then rename).

Re-classing an instance to a generated subclass is what `torch.nn.utils.parametrize` does to a module;
`detach` restores the original classes (`to_dense`). Recipes whose checkpoints load correctly as plain
models (N:M weights are exact zeros in dense tensors) skip this and keep their base model type.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

from torch import nn

from upcycle import format as fmt
from upcycle.fsutil import atomic_directory, check_output
from upcycle.recipes import registry

PREFIX = "upcycle_"
# Registered at import so that plain `AutoModelForCausalLM.from_pretrained` finds them; others on first use.
KNOWN_BASES = ("llama", "mistral", "qwen2", "qwen3")

_model_classes: dict[type, type] = {}  # base model class -> Upcycle subclass
_config_classes: dict[type, type] = {}


def is_upcycle_class(model: nn.Module) -> bool:
    return type(model) in _model_classes.values()


def base_model_type(model_type: str) -> str:
    return model_type[len(PREFIX):] if model_type.startswith(PREFIX) else model_type


def config_class_for(base: type) -> type:
    """`Upcycle<Base>Config`: `base` with model_type "upcycle_<base type>", registered with AutoConfig."""
    if base in _config_classes.values():
        return base
    if base not in _config_classes:
        from transformers import AutoConfig

        name = f"Upcycle{base.__name__}"
        cls = type(name, (base,), {"model_type": PREFIX + base.model_type, "__module__": __name__,
                                   "__qualname__": name})
        setattr(sys.modules[__name__], name, cls)  # picklable by name
        AutoConfig.register(cls.model_type, cls, exist_ok=True)
        _config_classes[base] = cls
    return _config_classes[base]


def _init(self, config, *args, **kwargs):
    base = type(self).__mro__[1]
    base.__init__(self, config, *args, **kwargs)
    meta = fmt.parse(getattr(config, fmt.KEY, None), f"{type(self).__name__} config")
    if meta is None:
        raise ValueError(f"{type(self).__name__} needs config.{fmt.KEY} (the recipe's metadata); "
                         "build the dense model and call upcycle.convert instead.")
    registry.get(meta.recipe).from_metadata(self, meta.section)


def _save_pretrained(self, save_directory, *args, **kwargs):
    """Refresh the recipe's metadata from the live modules, then write atomically (temp dir + rename); other
    files already in `save_directory` are kept, as transformers' own `save_pretrained` keeps them."""
    check_output(save_directory, overwrite=True)  # still never the current directory
    refresh_metadata(self)
    base = type(self).__mro__[1]
    kwargs.setdefault("safe_serialization", True)
    return atomic_directory(Path(save_directory), lambda tmp: base.save_pretrained(self, tmp, *args, **kwargs),
                            keep_others=True)


def model_class_for(base: type) -> type:
    """`Upcycle<Base>`: a subclass of the HF model class `base` registered with AutoModelForCausalLM."""
    if base in _model_classes.values():
        return base
    if base not in _model_classes:
        from transformers import AutoModelForCausalLM

        config_cls = config_class_for(base.config_class)
        name = f"Upcycle{base.__name__}"
        doc = f"{base.__name__} with an upcycle recipe applied (see upcycle.hf_models)."
        cls = type(name, (base,), {"config_class": config_cls, "__init__": _init, "save_pretrained": _save_pretrained,
                                   "__module__": __name__, "__qualname__": name, "__doc__": doc})
        setattr(sys.modules[__name__], name, cls)
        AutoModelForCausalLM.register(config_cls, cls, exist_ok=True)
        _model_classes[base] = cls
    return _model_classes[base]


def register_base(model_type: str) -> None:
    """Register the Upcycle classes for the HF causal LM of `model_type` (e.g. "qwen2")."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    model_class_for(MODEL_FOR_CAUSAL_LM_MAPPING[CONFIG_MAPPING[model_type]])


def own_config(model: nn.Module) -> None:
    """Give `model` its own copy of its config (every submodule pointing at it too), so that converting a
    model never changes a config object the caller shares with other models."""
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(model, "_upcycle_owns_config", False):
        return
    new = copy.copy(cfg)
    for m in model.modules():
        if getattr(m, "config", None) is cfg:
            m.config = new
    model._upcycle_owns_config = True


def attach(model: nn.Module) -> None:
    """Re-class `model` (and its own copy of its config) to the Upcycle subclasses; a no-op when they are already."""
    own_config(model)
    if not is_upcycle_class(model):
        model.__class__ = model_class_for(type(model))
    if hasattr(model, "config") and type(model.config) not in _config_classes.values():
        model.config.__class__ = config_class_for(type(model.config))


def detach(model: nn.Module) -> None:
    """Back to the plain HF classes (the inverse of `attach`)."""
    if is_upcycle_class(model):
        model.__class__ = type(model).__mro__[1]
    cfg = getattr(model, "config", None)
    if cfg is not None and type(cfg) in _config_classes.values():
        cfg.__class__ = type(cfg).__mro__[1]


def plain_save_pretrained(model: nn.Module):
    """transformers' own `save_pretrained` of `model`'s class (the Upcycle override is atomic already)."""
    cls = type(model).__mro__[1] if is_upcycle_class(model) else type(model)
    return cls.save_pretrained


def refresh_metadata(model: nn.Module) -> None:
    """`model.config.upcycle` from the live modules, keeping extra keys other tools recorded (e.g. "source")."""
    meta = fmt.parse(getattr(model.config, fmt.KEY, None), "model.config")
    if meta is None:
        return
    recipe = registry.get(meta.recipe)
    setattr(model.config, fmt.KEY, fmt.make(meta.recipe, recipe.metadata(model), **meta.extra))


for _t in KNOWN_BASES:
    try:
        register_base(_t)
    except (KeyError, ImportError):  # an older transformers without this family
        pass
