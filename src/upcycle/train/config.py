"""TrainConfig: one typed dataclass that YAML files and `upcycle train` flags both map onto.

Every field is a YAML key and a flag (`seq_len` <-> `--seq-len`); flags override YAML, YAML overrides
the defaults here. Field metadata `help` is the flag's help text.

The recipe's own settings live in the nested `recipe:` section, not in TrainConfig's fields:

    recipe:
      name: bank_sparse          # default: the recipe the --model checkpoint was converted with
      keep_warmup_steps: 200     # a training option of the recipe (its train hooks read it)
      bank_size: 64              # conversion fields convert a dense --model on the fly
      keep: 16

Each registered recipe declares flags for its keys (`upcycle train --keep-warmup-steps 200 --keep 16`);
flags and flat YAML keys of that name land in the section. `resolve_recipe()` turns the section into the
recipe's typed config and options, with errors naming the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


def _f(default: Any, help: str, **kw) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    # --- input / output ---
    model: str | None = _f(None, "checkpoint dir from `upcycle convert`, or a dense HF dir (+ --bank-size/--keep)")
    data: list[str] = _f([], "text files, directories, .jsonl (field `text`) or .parquet files")
    out: str | None = _f(None, "output dir: metrics.jsonl, checkpoints/, model/ (the final model), loss_curve.png")
    tokenizer: str | None = _f(None, "tokenizer dir (default: the --model dir)")
    teacher: str | None = _f(None, "dense teacher checkpoint (default: the recipe's dense form of --model, "
                             "or the parent recorded in its metadata)")
    # --- the recipe ---
    recipe: dict = _f({}, "recipe NAME (default: the --model checkpoint's); its keys are the recipe flags below")
    # --- data ---
    seq_len: int = _f(2048, "tokens per packed training sequence")
    text_split: Literal["document", "paragraph", "line"] = _f(
        "document", "what one document of a text file is (EOS goes between documents)"
    )
    text_field: str = _f("text", "column that holds the text in .jsonl / .parquet files")
    val_fraction: float = _f(0.02, "fraction of packed sequences held out for validation loss (0: none)")
    val_max_sequences: int = _f(64, "at most this many held-out sequences")
    num_proc: int = _f(1, "processes for tokenisation")
    data_cache: str | None = _f(None, "datasets cache dir (default OUT/.cache/datasets)")
    # --- steps and batch ---
    steps: int = _f(1000, "optimizer steps")
    batch_size: int = _f(8, "sequences per micro-batch per process")
    grad_accum: int = _f(1, "micro-batches per optimizer step (global batch = batch_size * grad_accum * world)")
    seed: int = _f(0, "seed of data order, split and RNG")
    # --- optimizer and LR ---
    lr: float = _f(1e-4, "peak learning rate")
    min_lr_ratio: float = _f(0.1, "final LR of the cosine decay, as a fraction of --lr")
    lr_warmup_steps: int | None = _f(None, "linear LR warm-up steps (default: 5% of --steps)")
    weight_decay: float = _f(0.0, "AdamW weight decay of matrices (never norms, biases, the predictor gate scale)")
    adam_beta1: float = _f(0.9, "AdamW beta1")
    adam_beta2: float = _f(0.95, "AdamW beta2")
    grad_clip: float = _f(1.0, "clip the global gradient norm (0: off)")
    max_nonfinite_steps: int = _f(5, "stop (exit 3, no final model) after more than this many consecutive steps "
                                  "with a non-finite loss or gradient norm; their updates are skipped")
    spike_warn_factor: float = _f(3.0, "warn when the loss exceeds this many times its running mean (0: off)")
    train_only: Literal["all", "ffn"] = _f("all", "ffn: freeze everything except the FFN (and routing) parameters")
    # --- objective ---
    distill_weight: float = _f(1.0, "weight of KL(teacher || student) on logits; 0 turns distillation off")
    distill_temperature: float = _f(1.0, "softmax temperature of the distillation KL (scaled by T^2)")
    feature_distill_weight: float = _f(0.0, "weight of the per-layer normalised MSE to the teacher's layer outputs")
    loss_chunk_tokens: int = _f(2048, "compute logits and losses this many tokens at a time (0: all at once)")
    # --- efficiency ---
    device: str = _f("auto", "auto (cuda:LOCAL_RANK if available, else cpu), cpu or cuda")
    precision: Literal["auto", "bf16", "fp32"] = _f("auto", "auto: bf16 autocast on GPU, fp32 on CPU")
    teacher_dtype: Literal["auto", "bf16", "fp32"] = _f("auto", "auto: bf16 on GPU, fp32 on CPU")
    gradient_checkpointing: bool = _f(False, "recompute each decoder layer in the backward pass")
    attn_implementation: str = _f("sdpa", "attention kernel: sdpa, eager, flash_attention_2")
    rope_theta: float | None = _f(None, "override the RoPE base (long context)")
    rope_scaling: dict | None = _f(None, 'RoPE scaling as JSON, e.g. {"rope_type": "yarn", "factor": 4.0}')
    max_position_embeddings: int | None = _f(None, "override max_position_embeddings (long context)")
    num_threads: int | None = _f(None, "CPU threads per process (default: torch's choice)")
    # --- feedback and checkpoints ---
    log_every: int = _f(1, "write metrics every N steps")
    eval_every: int = _f(100, "validation loss every N steps (0: only at the end)")
    save_every: int = _f(500, "checkpoint every N steps (0: only at the end and on Ctrl-C)")
    keep_checkpoints: int = _f(2, "keep the newest N checkpoints")
    resume: bool = _f(False, "continue from the newest checkpoint in OUT/checkpoints")
    progress: bool = _f(True, "show a progress bar")
    tensorboard: bool = _f(True, "also log to OUT/tensorboard when tensorboard is installed")
    save_dtype: Literal["auto", "bf16", "fp16", "fp32"] = _f("auto", "dtype of the final model (auto: the input's)")

    # ------------------------------------------------------------------ conversions
    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> TrainConfig:
        if not isinstance(d, dict):
            raise ValueError(f"{source}: expected a mapping of TrainConfig keys, got {type(d).__name__}.")
        d = dict(d)
        section = d.pop("recipe", None) or {}
        if isinstance(section, str):
            section = {"name": section}
        if not isinstance(section, dict):
            raise ValueError(f"{source}: recipe must be a recipe name or a mapping, got {type(section).__name__}.")
        section = dict(section)
        names = [f.name for f in dataclasses.fields(cls)]
        recipe_keys = recipe_flag_keys()
        for k in [k for k in d if k not in names and k in recipe_keys]:
            section[k] = d.pop(k)  # a flat key of a recipe flag: the same as the flag
        bad = [k for k in d if k not in names]
        if bad:
            valid = names + sorted(recipe_keys)
            hints = [f"{k!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(k, valid, 1)) else repr(k)
                     for k in bad]
            raise ValueError(f"{source}: unknown key(s) {', '.join(hints)}. Valid keys: {', '.join(valid)}.")
        cfg = cls(**{k: _coerce(cls, k, v, source) for k, v in d.items()}, recipe=section)
        return cfg

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> TrainConfig:
        return cls.from_dict(read_yaml(path), source=str(path))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self, path: str | os.PathLike | None = None) -> str:
        import yaml

        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    @property
    def warmup_steps(self) -> int:
        """LR warm-up steps, resolved."""
        return self.lr_warmup_steps if self.lr_warmup_steps is not None else max(1, self.steps // 20)

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ checks
    def validate(self) -> TrainConfig:
        """Raise ValueError naming the flag / YAML key to fix; returns self."""
        for name in ("model", "out"):
            if not getattr(self, name):
                raise ValueError(f"no {name}: pass --{name} DIR (or `{name}:` in the YAML config).")
        if not self.data:
            raise ValueError("no data: pass --data FILE_OR_DIR... (or `data:` in the YAML config).")
        positive = ("seq_len", "steps", "batch_size", "grad_accum", "log_every", "keep_checkpoints")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)} (--{_flag(name)}).")
        for name in _fields(type(self)):  # nan / inf pass every comparison below: refuse them first
            v = getattr(self, name)
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"{name}={v} is not a finite number (--{_flag(name)}).")
        for name in ("eval_every", "save_every", "lr_warmup_steps", "loss_chunk_tokens", "val_max_sequences",
                     "max_nonfinite_steps", "spike_warn_factor"):
            if (getattr(self, name) or 0) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)} (--{_flag(name)}).")
        for name in ("distill_weight", "feature_distill_weight", "weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)} (--{_flag(name)}).")
        if self.lr <= 0 or self.distill_temperature <= 0:
            raise ValueError("lr and distill_temperature must be > 0.")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must lie in [0, 1), got {self.val_fraction}.")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}.")
        for name, f in _fields(type(self)).items():
            choices = _choices(f)
            if choices and getattr(self, name) not in choices:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {choices}.")
        self.resolve_recipe()
        return self

    def validate_plan(self) -> TrainConfig:
        """What `--plan` needs: `validate` without --data and --out (the plan reads only the model's config)."""
        return self.replace(data=self.data or ["(plan)"], out=self.out or "(plan)").validate() and self

    def resolve_recipe(self) -> ResolvedRecipe:
        """The recipe section as typed objects: the recipe (None: the model's own, decided when it loads),
        its conversion config for a dense --model (None: no on-the-fly conversion) and its training options."""
        from upcycle.recipes import registry

        section = dict(self.recipe)
        name = section.pop("name", None)
        if name is None and section:
            owners = [r for r in registry.load_all() if r.cli and set(section) <= set(r.cli.train_flags)]
            if len(owners) != 1:
                raise ValueError(f"recipe keys {sorted(section)}: name the recipe (--recipe NAME, one of "
                                 f"{', '.join(registry.names())}).")
            name = owners[0].name
        if name is None:
            return ResolvedRecipe(None, None, None)
        recipe = registry.get(name)
        convert_fields = {f.name: f for f in dataclasses.fields(recipe.config_cls)}
        option_fields = {f.name: f for f in dataclasses.fields(recipe.train_options_cls or _NoOptions)}
        bad = [k for k in section if k not in convert_fields and k not in option_fields]
        if bad:
            valid = sorted(set(convert_fields) | set(option_fields))
            hints = [f"{k!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(k, valid, 1)) else repr(k)
                     for k in bad]
            raise ValueError(f"recipe {name}: unknown key(s) {', '.join(hints)}. Valid keys: {', '.join(valid)}.")
        where = f"recipe {name}"
        conv = {k: _coerce(recipe.config_cls, k, v, where) for k, v in section.items() if k in convert_fields}
        opts = {k: _coerce(recipe.train_options_cls, k, v, where) for k, v in section.items() if k in option_fields}
        try:
            config = recipe.train_convert_config(conv) if conv and recipe.train_convert_config else None
            if conv and recipe.train_convert_config is None:
                raise ValueError(f"recipe {name} does not convert a dense --model during training: run "
                                 "`upcycle convert` first.")
            options = recipe.train_options_cls(**opts) if recipe.train_options_cls else None
        except TypeError as e:
            raise ValueError(f"{where}: {e}") from e
        return ResolvedRecipe(recipe, config, options)


@dataclass
class _NoOptions:
    pass


@dataclass(frozen=True)
class ResolvedRecipe:
    recipe: Any  # upcycle.recipes.Recipe | None
    convert_config: Any  # the recipe's config for an on-the-fly conversion, or None
    options: Any  # the recipe's training options, or None (its defaults)


def recipe_flag_keys() -> set[str]:
    """Every key a registered recipe declares as an `upcycle train` flag."""
    from upcycle.recipes import registry

    return {k for r in registry.load_all() if r.cli for k in r.cli.train_flags}


def read_yaml(path: str | os.PathLike) -> dict:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file {p} does not exist: pass an existing YAML file to --config.")
    try:
        d = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{p} is not valid YAML: {e}") from e
    return d


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _base_type(tp: Any) -> Any:
    """`int | None` -> int; Literal -> str; list[str] -> list."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    if origin is Literal:
        return type(typing.get_args(tp)[0])
    return origin or tp


def _choices(f: dataclasses.Field) -> tuple | None:
    tp = _hints(TrainConfig)[f.name]
    return typing.get_args(tp) if typing.get_origin(tp) is Literal else None


def _coerce(cls, name: str, value: Any, source: str) -> Any:
    """YAML/CLI value -> the field's type, with an error naming the key."""
    if value is None:
        return None
    tp = _base_type(_hints(cls)[name])
    try:
        if tp is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if tp is list:
            return [str(v) for v in ([value] if isinstance(value, (str, os.PathLike)) else value)]
        if tp is dict:
            return json.loads(value) if isinstance(value, str) else dict(value)
        if tp is float:
            return float(value)
        if tp is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        return str(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: {name}={value!r} is not a valid {tp.__name__}.") from e


RECIPE_DEST = "recipe."  # argparse dest prefix of recipe flags


def add_config_arguments(parser) -> None:
    """One argparse flag per TrainConfig field, then one group per recipe with its flags; unset flags stay
    absent (so YAML values survive)."""
    import argparse

    from upcycle.recipes import registry

    for name, f in _fields(TrainConfig).items():
        tp = _base_type(_hints(TrainConfig)[name])
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        shown = not (default is None or default is False or default in ([], {}))  # False: the flag's absence
        text = f.metadata.get("help", "") + (f" ({default})" if shown else "")
        kw: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": text.replace("%", "%%")}
        if name == "recipe":
            kw.update(metavar="NAME", choices=registry.names())
        elif tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif tp is list:
            kw["nargs"] = "+"
        else:
            kw["type"] = str if tp is dict else tp
            if _choices(f):
                kw["choices"] = _choices(f)
        parser.add_argument(f"--{_flag(name)}", **kw)
    seen: set[str] = set()
    for r in registry.load_all():
        if not r.cli or not r.cli.train_flags:
            continue
        group = parser.add_argument_group(f"{r.name} recipe (--recipe {r.name})", r.summary)
        for key, spec in r.cli.train_flags.items():
            if key in seen:  # two recipes with a flag of one name share it
                continue
            seen.add(key)
            spec = dict(spec)
            spec["help"] = spec.get("help", "").replace("%", "%%")
            if "choices" not in spec:
                spec.setdefault("metavar", key.upper())
            group.add_argument(f"--{_flag(key)}", dest=RECIPE_DEST + key, default=argparse.SUPPRESS, **spec)


def config_from_args(args, yaml_path: str | None = None) -> TrainConfig:
    """Defaults < YAML file < explicit flags."""
    d = read_yaml(yaml_path) if yaml_path else {}
    if yaml_path:
        TrainConfig.from_dict(d, source=yaml_path)  # report bad YAML keys before flags are merged
    flags = vars(args)
    d.update({k: v for k, v in flags.items() if k in _fields(TrainConfig) and k != "recipe"})
    section = d.get("recipe") or {}
    section = dict({"name": section} if isinstance(section, str) else section)
    for k in [k for k in list(d) if k in recipe_flag_keys()]:  # flat YAML keys first, flags win over them
        section[k] = d.pop(k)
    if "recipe" in flags:
        section["name"] = flags["recipe"]
    section.update({k[len(RECIPE_DEST):]: v for k, v in flags.items() if k.startswith(RECIPE_DEST)})
    d["recipe"] = section
    return TrainConfig.from_dict(d, source=yaml_path or "flags")
