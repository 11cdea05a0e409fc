"""TrainConfig: one typed dataclass that YAML files and `upcycle train` flags both map onto.

Every field is a YAML key and a flag (`seq_len` <-> `--seq-len`); flags override YAML, YAML overrides
the defaults here. Field metadata `help` is the flag's help text.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
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
    teacher: str | None = _f(None, "dense teacher checkpoint (default: --model loaded again and made dense)")
    # --- on-the-fly conversion of a dense --model ---
    bank_size: int | None = _f(None, "convert a dense --model with this bank size (needs --keep)")
    keep: int | None = _f(None, "channels kept per bank when converting a dense --model")
    predictor_budget: float = _f(0.10, "predictor bytes per token / dense FFN bytes, when converting (see convert)")
    predictor_rank: int | None = _f(None, "pin a low-rank predictor of this rank when converting")
    gate_mode: Literal["ste", "sigmoid"] = _f("ste", "gate when converting: ste (hard 0/1) or sigmoid")
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
    predictor_lr_mult: float = _f(10.0, "LR multiplier of predictor parameters (fresh, unlike the pretrained rest)")
    weight_decay: float = _f(0.0, "AdamW weight decay of matrices (never norms, biases, the predictor gate scale)")
    adam_beta1: float = _f(0.9, "AdamW beta1")
    adam_beta2: float = _f(0.95, "AdamW beta2")
    grad_clip: float = _f(1.0, "clip the global gradient norm (0: off)")
    train_only: Literal["all", "ffn"] = _f("all", "ffn: freeze everything except FFN and predictor parameters")
    # --- objective ---
    distill_weight: float = _f(1.0, "weight of KL(teacher || student) on logits; 0 turns distillation off")
    distill_temperature: float = _f(1.0, "softmax temperature of the distillation KL (scaled by T^2)")
    feature_distill_weight: float = _f(0.0, "weight of the per-layer normalised MSE to the teacher's layer outputs")
    aux_weight: float = _f(0.0, "weight of the BCE pulling the predictor toward the oracle top-k of |h|")
    aux_steps: int = _f(0, "the aux weight decays linearly to 0 over this many steps (0: constant)")
    loss_chunk_tokens: int = _f(2048, "compute logits and losses this many tokens at a time (0: all at once)")
    # --- sparsity schedule ---
    keep_warmup_steps: int = _f(0, "keep goes from bank_size to the target over this many steps (0: target at step 0)")
    keep_schedule: Literal["linear", "cosine"] = _f("linear", "shape of the keep warm-up")
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
        names = [f.name for f in dataclasses.fields(cls)]
        bad = [k for k in d if k not in names]
        if bad:
            hints = [f"{k!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(k, names, 1)) else repr(k)
                     for k in bad]
            raise ValueError(f"{source}: unknown key(s) {', '.join(hints)}. Valid keys: {', '.join(names)}.")
        cfg = cls(**{k: _coerce(cls, k, v, source) for k, v in d.items()})
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
        for name in ("eval_every", "save_every", "lr_warmup_steps", "keep_warmup_steps", "aux_steps",
                     "loss_chunk_tokens", "val_max_sequences"):
            if (getattr(self, name) or 0) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)} (--{_flag(name)}).")
        for name in ("distill_weight", "feature_distill_weight", "aux_weight", "weight_decay", "grad_clip",
                     "predictor_lr_mult"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)} (--{_flag(name)}).")
        if self.lr <= 0 or self.distill_temperature <= 0:
            raise ValueError("lr and distill_temperature must be > 0.")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must lie in [0, 1), got {self.val_fraction}.")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}.")
        if (self.bank_size is None) != (self.keep is None):
            raise ValueError("--bank-size and --keep go together (they convert a dense --model on the fly).")
        for name, f in _fields(type(self)).items():
            choices = _choices(f)
            if choices and getattr(self, name) not in choices:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {choices}.")
        return self


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


def add_config_arguments(parser) -> None:
    """One argparse flag per TrainConfig field; unset flags stay absent (so YAML values survive)."""
    import argparse

    for name, f in _fields(TrainConfig).items():
        tp = _base_type(_hints(TrainConfig)[name])
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        text = f.metadata.get("help", "") + ("" if default in (None, []) or tp is bool else f" [{default}]")
        kw: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": text.replace("%", "%%")}
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif tp is list:
            kw["nargs"] = "+"
        else:
            kw["type"] = str if tp is dict else tp
            if _choices(f):
                kw["choices"] = _choices(f)
        parser.add_argument(f"--{_flag(name)}", **kw)


def config_from_args(args, yaml_path: str | None = None) -> TrainConfig:
    """Defaults < YAML file < explicit flags."""
    d = read_yaml(yaml_path) if yaml_path else {}
    if yaml_path:
        TrainConfig.from_dict(d, source=yaml_path)  # report bad YAML keys before flags are merged
    d.update({k: v for k, v in vars(args).items() if k in _fields(TrainConfig)})
    return TrainConfig.from_dict(d, source=yaml_path or "flags")
