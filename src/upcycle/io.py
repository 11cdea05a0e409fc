"""Save and load converted models: HF layout + safetensors, atomic writes, strict loads, clear errors.

`load` dispatches on the recipe saved in config.json["upcycle"] (`upcycle.format`) through the recipe
registry; it reads checkpoints of every format version up to the current one.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

from upcycle import format as fmt
from upcycle import hf_models
from upcycle.fsutil import atomic_directory, check_output
from upcycle.recipes import registry

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint directory is missing, incomplete, corrupt or does not match its config."""


def save(model: nn.Module, out: str | os.PathLike, tokenizer=None, overwrite: bool = False,
         inputs: tuple[str | os.PathLike, ...] = (), **save_kwargs) -> Path:
    """Atomically write `model` (HF `save_pretrained` layout, safetensors) and `tokenizer` to `out`.

    `out` may be new, empty or a previous checkpoint (replaced atomically); a directory with other files or an
    existing file is refused unless `overwrite` (then other files are kept, a file is replaced); `inputs` (e.g.
    the source checkpoint) and the current directory are never replaced. See `upcycle.fsutil`. A converted
    model's recipe metadata is refreshed from its live modules first (see `upcycle.hf_models`).
    """
    check_output(out, overwrite=overwrite, inputs=inputs)
    hf_models.refresh_metadata(model)
    save_kwargs.setdefault("safe_serialization", True)
    hf_save = hf_models.plain_save_pretrained(model)

    def write(tmp: Path) -> None:
        hf_save(model, tmp, **save_kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    return atomic_directory(out, write, keep_others=overwrite)


def _read_config(path: Path) -> dict:
    if not path.exists():
        raise CheckpointError(f"{path} does not exist: pass a directory written by upcycle or transformers.")
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file: pass the checkpoint directory that holds config.json.")
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise CheckpointError(
            f"{path} has no config.json: it is not a complete checkpoint (an interrupted save?). Save it again."
        )
    try:
        return json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file} is not valid JSON ({e}): the checkpoint is corrupt; save it again.") from e


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [path / n for n in names]
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path} has no *.safetensors weights: save the model with safetensors.")
    for f in files:
        if not f.exists():
            raise CheckpointError(f"{f} is listed in the index but missing: the checkpoint is incomplete.")
    return files


def _read_state_dict(files: list[Path]) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state = {}
    for f in files:
        try:
            state.update(load_file(f))
        except Exception as e:  # safetensors raises its own error types for bad headers and truncation
            raise CheckpointError(
                f"{f} is corrupt or truncated ({type(e).__name__}: {e}). Re-save the checkpoint."
            ) from e
    return state


def load_pretrained(path: str | os.PathLike) -> tuple[nn.Module, object | None]:
    """(dense model, tokenizer or None) from a transformers checkpoint directory or a .gguf file.

    GGUF weights are dequantised by transformers (needs the `gguf` package); the quantisation config
    is dropped so the model saves as a plain checkpoint.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    gguf = path.suffix == ".gguf"
    if gguf and not path.is_file():
        raise CheckpointError(f"{path} does not exist: pass a .gguf file or a checkpoint directory.")
    if not gguf and not (path.is_dir() and (path / "config.json").exists()):
        raise CheckpointError(
            f"{path}: not a checkpoint directory with config.json, nor a .gguf file "
            "(save one with model.save_pretrained(DIR))."
        )
    if gguf:
        check_gguf(path)
    where, extra = (path.parent, {"gguf_file": path.name}) if gguf else (path, {})
    try:
        model = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32 if gguf else "auto", **extra)
    except ImportError as e:
        raise CheckpointError(f"{path}: {e} (for GGUF files: pip install gguf)") from e
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        if gguf:
            raise CheckpointError(f"{path} is not a readable GGUF file ({type(e).__name__}: {first}).") from e
        raise CheckpointError(f"transformers could not load {path}: {first}") from e
    if gguf and hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
        model.__dict__.pop("hf_quantizer", None)
        model.is_quantized = False
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **extra)
    except Exception:
        tokenizer = None
    return model.eval(), tokenizer


GGUF_MAGIC = b"GGUF"


def check_gguf(path: Path) -> None:
    """A CheckpointError naming the file unless it starts like a GGUF file (magic bytes and a known version)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}.") from e
    if len(head) < 8 or head[:4] != GGUF_MAGIC:
        raise CheckpointError(f"{path} is not a readable GGUF file (it does not start with the GGUF magic bytes): "
                              "pass a .gguf model file (e.g. from llama.cpp's converter) or a checkpoint directory.")
    version = int.from_bytes(head[4:8], "little")
    if not 1 <= version <= 3:
        raise CheckpointError(f"{path} is not a readable GGUF file (unknown GGUF version {version}).")


def load(path: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """Load a checkpoint saved by upcycle (or a plain dense HF checkpoint) with identical weights.

    A dense checkpoint (or a .gguf file) loads as the plain transformers model (FFN density 1.0).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    path = Path(path)
    if path.suffix == ".gguf":
        model = load_pretrained(path)[0]
        return model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    raw = _read_config(path)
    where = path / "config.json"
    try:
        meta = fmt.parse(raw.get(fmt.KEY), where)
        recipe = None if meta is None else registry.get(meta.recipe)
        if recipe is not None:
            recipe.config_from_section(meta.section, str(where))  # validate before building anything
    except ValueError as e:
        raise CheckpointError(str(e) if str(where) in str(e) else f"{where}: {e}") from e
    model_type = raw.get("model_type")
    orphan = None  # an upcycle model type without its metadata: built as the base model, then refused below
    if isinstance(model_type, str) and model_type.startswith(hf_models.PREFIX):
        base = hf_models.base_model_type(model_type)
        try:
            hf_models.register_base(base)
        except KeyError as e:
            raise CheckpointError(f"{where}: transformers has no model type {base!r}: upgrade transformers.") from e
        if meta is None:
            orphan = f"{where}: model_type {model_type!r} needs the 'upcycle' entry, which is missing: the config " \
                     "was edited or is corrupt; convert the dense model again."
    state = _read_state_dict(_weight_files(path))
    try:
        if orphan:
            from transformers.models.auto.configuration_auto import CONFIG_MAPPING

            hf_config = CONFIG_MAPPING[base].from_dict({k: v for k, v in raw.items() if k != "model_type"})
        else:
            hf_config = AutoConfig.from_pretrained(path)
    except Exception as e:
        raise CheckpointError(f"transformers cannot read {where}: {e}") from e
    saved_dtype = next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)
    try:
        model = AutoModelForCausalLM.from_config(hf_config, dtype=saved_dtype)
        if recipe is not None and not hf_models.is_upcycle_class(model):
            recipe.from_metadata(model, meta.section)  # format 1 before re-classing: the base model type
    except ValueError as e:
        raise CheckpointError(f"{path}: the recipe in config.json does not fit the model ({e}).") from e
    _load_strict(model, state, path)
    if orphan:
        raise CheckpointError(orphan)
    if (path / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(path)
    model.eval()
    return model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    expected = model.state_dict()
    tied = set(getattr(model, "_tied_weights_keys", None) or {}) if model.config.tie_word_embeddings else set()
    missing = [k for k in expected if k not in state and k not in tied]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        hint = (
            "the weights do not match config.json"
            + (" (a dense checkpoint with upcycle tensors, or a converted one without its 'upcycle' config?)"
               if any(".predictor." in k for k in missing + unexpected) else "")
        )
        raise CheckpointError(
            f"{path}: {hint}. Missing: {missing[:5]}{'...' if len(missing) > 5 else ''}; "
            f"unexpected: {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}."
        )
    for k, t in state.items():
        if t.shape != expected[k].shape:
            raise CheckpointError(
                f"{path}: tensor {k} has shape {tuple(t.shape)} but config.json implies "
                f"{tuple(expected[k].shape)}: the weights and config.json come from different models."
            )
    model.load_state_dict(state, strict=False)
    if tied:
        model.tie_weights()
