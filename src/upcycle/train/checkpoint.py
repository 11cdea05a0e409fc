"""Resumable training checkpoints: OUT/checkpoints/step_NNNNNNNN/.

One checkpoint holds the (sharded) model and optimizer state through torch.distributed.checkpoint,
the LR scheduler and trainer state (step, data position, tokens) in trainer_state.json, and each
process's RNG state. Every checkpoint is written to a hidden temp dir and renamed into place
(upcycle.io.atomic_directory), so a crash or Ctrl-C mid-write never leaves a partial checkpoint.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
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


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])


def save_checkpoint(out: str | Path, module: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler, trainer_state: dict, env: DistEnv, keep_last: int = 2) -> Path:
    """Collective: every process calls it. Returns the checkpoint directory."""
    path = checkpoint_dir(out, trainer_state["step"])
    model_sd, optim_sd = get_state_dict(module, optimizer)

    def write_all(tmp: Path) -> None:
        with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / "state"))
        torch.save(_rng_state(), tmp / f"rng_rank{env.rank}.pt")
        if env.is_main:
            meta = {**trainer_state, "world_size": env.world, "scheduler": scheduler.state_dict()}
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
    state = {"model": model_sd, "optim": optim_sd}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.load(state, checkpoint_id=str(path / "state"))
    set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    scheduler.load_state_dict(meta.pop("scheduler"))
    rng = path / f"rng_rank{env.rank}.pt"
    if rng.exists() and meta.get("world_size") == env.world:
        _set_rng_state(torch.load(rng, weights_only=False))
    else:
        log.warning("checkpoint %s was written by %s processes, this run has %d: RNG state not restored "
                    "(model, optimizer and data position are).", path, meta.get("world_size"), env.world)
    return meta
