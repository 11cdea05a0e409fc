"""Save and load converted models: HF layout + safetensors, atomic writes, clear errors."""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint directory is missing, incomplete, corrupt or does not match its config."""


def _fsync_tree(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def atomic_directory(out: str | os.PathLike, write) -> Path:
    """Call `write(tmp_dir)`, then move tmp_dir to `out` in one rename.

    An interrupted write leaves only a hidden `.NAME.tmp-*` sibling, never a partial `out`; an
    existing `out` is replaced only after the new one is complete.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        write(tmp)
        _fsync_tree(tmp)
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def save(model: nn.Module, out: str | os.PathLike, tokenizer=None, **save_kwargs) -> Path:
    """Atomically write `model` (HF `save_pretrained` layout, safetensors) and `tokenizer` to `out`."""
    from upcycle.convert import upcycle_metadata

    if getattr(model, "upcycle_config", None) is not None:
        # Keep extra keys other tools recorded (e.g. the source checkpoint), refresh the sparsity.
        previous = getattr(model.config, "upcycle", None) or {}
        model.config.upcycle = {**previous, **upcycle_metadata(model, model.upcycle_config)}
    save_kwargs.setdefault("safe_serialization", True)

    def write(tmp: Path) -> None:
        type(model).save_pretrained(model, tmp, **save_kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    return atomic_directory(out, write)


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
    where, extra = (path.parent, {"gguf_file": path.name}) if gguf else (path, {})
    try:
        model = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32 if gguf else "auto", **extra)
    except ImportError as e:
        raise CheckpointError(f"{path}: {e} (for GGUF files: pip install gguf)") from e
    except Exception as e:
        raise CheckpointError(f"transformers could not load {path}: {e}") from e
    if gguf and hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
        model.__dict__.pop("hf_quantizer", None)
        model.is_quantized = False
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **extra)
    except Exception:
        tokenizer = None
    return model.eval(), tokenizer


def load(path: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """Load a checkpoint saved by upcycle (or a plain dense HF checkpoint) with identical weights.

    A dense checkpoint (or a .gguf file) loads as the plain transformers model (FFN density 1.0).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from upcycle.config import BankSparseConfig
    from upcycle.convert import FORMAT_VERSION, convert

    path = Path(path)
    if path.suffix == ".gguf":
        model = load_pretrained(path)[0]
        return model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    raw = _read_config(path)
    meta = raw.get("upcycle")
    if meta is not None and meta.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} was written by a newer upcycle (format {meta['format_version']} > {FORMAT_VERSION}): "
            "upgrade upcycle."
        )
    state = _read_state_dict(_weight_files(path))
    try:
        hf_config = AutoConfig.from_pretrained(path)
    except Exception as e:
        raise CheckpointError(f"transformers cannot read {path}/config.json: {e}") from e
    saved_dtype = next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)
    model = AutoModelForCausalLM.from_config(hf_config, dtype=saved_dtype)
    if meta is not None:
        if meta.get("recipe") != "bank_sparse":
            raise CheckpointError(f"{path}: unknown upcycle recipe {meta.get('recipe')!r}.")
        cfg = BankSparseConfig.from_dict({**meta["bank_sparse"], "predictor_init": "none"})
        convert(model, cfg, progress=False)
    _load_strict(model, state, path)
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
