"""Resumable training checkpoints: OUT/checkpoints/step_NNNNNNNN/.

One checkpoint holds the (sharded) model and optimizer state through torch.distributed.checkpoint,
the LR scheduler and trainer state (step, data position, tokens) in trainer_state.json, and each
process's RNG state (rng_rankR.json + .safetensors). Every checkpoint is written to a hidden temp dir
and renamed into place (upcycle.fsutil.atomic_directory), so a crash or Ctrl-C mid-write never leaves a
partial checkpoint.

Nothing on the load path unpickles arbitrary objects, so resuming from a checkpoint directory made
elsewhere cannot run code: RNG states are tensors (safetensors) and JSON, DCP's tensor items are read
with `weights_only=True`, and DCP's `.metadata` pickle is read by an unpickler that admits only the
metadata classes DCP writes.
"""

from __future__ import annotations

import json
import logging
import pickle
import random
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import StorageMeta
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from upcycle.fsutil import atomic_directory
from upcycle.train.distributed import DistEnv

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_dir(out: str | Path, step: int) -> Path:
    return Path(out) / "checkpoints" / f"step_{step:08d}"


def list_checkpoints(out: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temp dirs of interrupted writes are hidden and skipped)."""
    root = Path(out) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / STATE_FILE).exists()]
    return [p for _, p in sorted(found)]


def _save_rng(path: Path, rank: int) -> None:
    """This process's RNG states: torch / CUDA generator states as tensors, Python's and NumPy's as JSON."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors |= {f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    version, state, gauss = random.getstate()
    plain: dict = {"python": [version, list(state), gauss]}
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        plain["numpy"] = [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    except ImportError:
        pass
    save_file(tensors, str(path / f"rng_rank{rank}.safetensors"))
    (path / f"rng_rank{rank}.json").write_text(json.dumps(plain))


def _load_rng(path: Path, rank: int) -> bool:
    """Restore what `_save_rng` wrote; False when this rank has no saved state."""
    tf, jf = path / f"rng_rank{rank}.safetensors", path / f"rng_rank{rank}.json"
    if not (tf.exists() and jf.exists()):
        return False
    tensors, plain = load_file(str(tf)), json.loads(jf.read_text())
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda")), key=lambda k: int(k[4:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, state, gauss = plain["python"]
    random.setstate((version, tuple(state), gauss))
    if "numpy" in plain:
        import numpy as np

        kind, keys, pos, has_gauss, cached = plain["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    return True


class _MetadataUnpickler(pickle.Unpickler):
    """Admits only what torch.distributed.checkpoint writes into `.metadata`: its dataclasses, torch.Size,
    dtypes and layouts, paths. Any other global (os.system, ...) is refused."""

    MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem",
               "torch.distributed.checkpoint.planner")

    def find_class(self, module: str, name: str):
        ok = (module in self.MODULES and not name.startswith("__")) or (module, name) in {
            ("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
            ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"), ("collections", "OrderedDict")}
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout,
                                                                         torch.memory_format)):
            ok = True
        if not ok:
            raise pickle.UnpicklingError(f"checkpoint metadata refers to {module}.{name}, not a torch.distributed."
                                         "checkpoint metadata class: refusing to load it (from elsewhere?)")
        return super().find_class(module, name)


class SafeFileSystemReader(FileSystemReader):
    """DCP's FileSystemReader with the `.metadata` pickle read by `_MetadataUnpickler`."""

    def read_metadata(self, *args, **kwargs):
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def _module_states(module: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """Training state that modules keep outside their parameters (a shadow predictor's refit cache), by module
    name: any module with `resume_state()` / `load_resume_state(state)` (recipe-agnostic duck typing)."""
    return {name: m.resume_state() for name, m in module.named_modules() if hasattr(m, "resume_state")}


def save_checkpoint(out: str | Path, module: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler, trainer_state: dict, env: DistEnv, keep_last: int = 2) -> Path:
    """Collective: every process calls it. Returns the checkpoint directory."""
    path = checkpoint_dir(out, trainer_state["step"])
    model_sd, optim_sd = get_state_dict(module, optimizer)
    modules = _module_states(module)

    def write_all(tmp: Path) -> None:
        with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            state = {"model": model_sd, "optim": optim_sd, **({"modules": modules} if modules else {})}
            dcp.save(state, checkpoint_id=str(tmp / "state"))
        _save_rng(tmp, env.rank)
        if env.is_main:
            meta = {**trainer_state, "world_size": env.world, "scheduler": scheduler.state_dict(),
                    "module_states": bool(modules)}
            (tmp / STATE_FILE).write_text(json.dumps(meta, indent=1, default=float))
        env.barrier()  # every rank's files are in tmp before rank 0 renames it

    if env.is_main:
        atomic_directory(path, lambda tmp: write_all(Path(env.broadcast(str(tmp)))))
    else:
        write_all(Path(env.broadcast(None)))
    env.barrier()
    if env.is_main:
        for old in list_checkpoints(out)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return path


def load_checkpoint(path: str | Path, module: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                    env: DistEnv) -> dict:
    """Restore model, optimizer, scheduler and this process's RNG in place; returns the trainer state."""
    path = Path(path)
    meta = json.loads((path / STATE_FILE).read_text())
    model_sd, optim_sd = get_state_dict(module, optimizer)
    modules = _module_states(module) if meta.pop("module_states", False) else {}  # (older checkpoints: none)
    state = {"model": model_sd, "optim": optim_sd, **({"modules": modules} if modules else {})}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        try:
            dcp.load(state, storage_reader=SafeFileSystemReader(str(path / "state")))
        except (Exception, CheckpointException) as e:  # DCP wraps every rank's failure: say it in one line
            failures = getattr(e, "failures", None) or {}
            why = "; ".join(str(f).splitlines()[0] for f in failures.values()) or str(e).splitlines()[0]
            raise ValueError(f"--resume: cannot read the checkpoint {path} ({why}); it is corrupt or was not "
                             "written by upcycle: start a new run (a new --out).") from e
    set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    for name, m in module.named_modules():
        if name in modules:
            m.load_resume_state(state["modules"][name])
    scheduler.load_state_dict(meta.pop("scheduler"))
    if not (meta.get("world_size") == env.world and _load_rng(path, env.rank)):
        log.warning("checkpoint %s was written by %s processes, this run has %d: RNG state not restored "
                    "(model, optimizer and data position are).", path, meta.get("world_size"), env.world)
    return meta
