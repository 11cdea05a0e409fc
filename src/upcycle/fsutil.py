"""Writing directories safely: everything lands in a hidden temp sibling first and is renamed into place."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path


def _fsync_tree(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def atomic_directory(out: str | os.PathLike, write: Callable[[Path], object]) -> Path:
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
