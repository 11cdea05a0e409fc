"""Writing directories safely: never delete what the user did not ask to replace, never leave a half-written one.

Everything lands in a hidden temp sibling (`.NAME.tmp-PID-RANDOM`) first and is renamed into place, so an
interrupted write leaves no partial `NAME`; an existing `NAME` is replaced only once the new one is complete.
What may be replaced (`check_output`):

- nothing there, an empty directory, or a previous checkpoint (config.json and checkpoint files only):
  replaced atomically;
- a directory holding other files, or a regular file: refused unless `overwrite=True` (CLI: --overwrite);
  with it, a file is replaced and a directory's other files are kept (hard-linked into the new directory,
  as plain `save_pretrained` leaves other files alone);
- the input model's directory, a directory inside it or holding it, the current directory or one holding it:
  always refused (replacing it would delete the input or the working directory).

Temp siblings left by interrupted writes (a killed process) are removed by the next write into the same parent.
"""

from __future__ import annotations

import errno
import fnmatch
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

log = logging.getLogger(__name__)

# What a checkpoint directory holds (transformers' save_pretrained, tokenizers, upcycle's own files).
CHECKPOINT_FILES = (
    "config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin",
    "pytorch_model.bin.index.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
    "merges.txt", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "spiece.model", "vocab.txt", "preprocessor_config.json",
)
# Legacy temp siblings (no PID in the name) older than this are abandoned.
STALE_SECONDS = 600


class OutputError(ValueError):
    """An output path that must not be written, or that the OS refused to write; the message names the fix."""


def is_checkpoint_file(name: str) -> bool:
    return any(fnmatch.fnmatch(name, pat) for pat in CHECKPOINT_FILES)


def other_files(path: Path) -> list[str]:
    """Entries of directory `path` that are not part of a checkpoint (what a replacement would lose)."""
    return sorted(e.name for e in path.iterdir() if not (e.is_file() and is_checkpoint_file(e.name)))


def _related(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def check_output(out: str | os.PathLike, overwrite: bool = False, inputs: Iterable[str | os.PathLike] = (),
                 flag: str = "--overwrite") -> Path:
    """Refuse (OutputError naming the path and the fix) to write `out` where it would lose the user's data."""
    out = Path(out)
    resolved = out.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise OutputError(f"{out} is the current directory (or holds it): pass a new directory as the output, "
                          "e.g. --out sparse-model.")
    for inp in inputs:
        src = Path(inp).resolve()
        if _related(resolved, src):
            raise OutputError(f"{out} is the input {inp}, inside it, or holds it: writing there would replace "
                              "the input. Pass a new directory as the output.")
    if resolved.exists() and not resolved.is_dir():
        if not overwrite:
            raise OutputError(f"{out} is an existing file: pass a directory path as the output, or {flag} to "
                              "replace the file.")
    elif resolved.is_dir():
        extra = other_files(resolved)
        if extra and not overwrite:
            shown = ", ".join(extra[:5]) + (", ..." if len(extra) > 5 else "")
            what = "a checkpoint with other files" if (resolved / "config.json").exists() else "not a checkpoint"
            raise OutputError(f"{out} is {what} ({shown}): choose another output directory, or pass {flag} to "
                              "write there anyway (other files are kept; a previous checkpoint's files are "
                              "replaced).")
    return out


def _fsync_tree(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file() and not f.is_symlink():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?:(?P<pid>\d+)-)?[0-9a-f]{8}$")


def clean_stale(parent: Path) -> list[Path]:
    """Remove the temp siblings (`.NAME.tmp-*`, `.NAME.old-*`) in `parent` that no running process is writing."""
    removed = []
    if not parent.is_dir():
        return removed
    for p in parent.iterdir():
        m = _TEMP.match(p.name)
        if m is None:
            continue
        if m["pid"] is not None:
            pid = int(m["pid"])
            stale = not _pid_alive(pid) or (pid == os.getpid() and m["kind"] == "old")
        else:  # written by an older upcycle: no PID, judged by age
            stale = time.time() - p.lstat().st_mtime > STALE_SECONDS
        if stale:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
            removed.append(p)
    if removed:
        log.info("removed %d leftover temp dir(s) of interrupted saves in %s", len(removed), parent)
    return removed


def os_error(path: Path, e: OSError) -> OutputError:
    """One line naming the path and the cause of an OS error while writing it."""
    causes = {errno.ENOSPC: "the disk is full", errno.EACCES: "permission denied", errno.EPERM: "not permitted",
              errno.EROFS: "read-only file system", errno.EBUSY: "the path is busy (in use or a mount point)",
              errno.EDQUOT: "disk quota exceeded", errno.ENOTDIR: "a parent is a file, not a directory",
              errno.ENAMETOOLONG: "the name is too long", errno.EXDEV: "the temp dir is on another file system"}
    cause = causes.get(e.errno, e.strerror or str(e))
    where = e.filename or path
    return OutputError(f"cannot write {path}: {cause} ({where}). Choose another output path or fix its permissions.")


def _link_others(old: Path, new: Path) -> None:
    """Hard-link `old`'s non-checkpoint entries into `new` (they survive `old`'s removal; nothing is copied)."""
    for name in other_files(old):
        src, dst = old / name, new / name
        if dst.exists():
            continue
        if src.is_symlink():
            os.symlink(os.readlink(src), dst)
        elif src.is_dir():
            shutil.copytree(src, dst, symlinks=True, copy_function=os.link)
        else:
            os.link(src, dst)


def atomic_directory(out: str | os.PathLike, write: Callable[[Path], object], keep_others: bool = False) -> Path:
    """Call `write(tmp_dir)`, then move tmp_dir to `out` in one rename.

    An interrupted write leaves only a hidden `.NAME.tmp-*` sibling (removed by the next write there), never a
    partial `out`; an existing `out` is replaced only after the new one is complete. `keep_others`: entries
    of an existing `out` that are not checkpoint files are kept (hard links), as plain `save_pretrained` does.
    Call `check_output` first where user data could be in the way. OS errors become an OutputError naming
    the path and the cause.
    """
    out = Path(out)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = out.parent / f".{out.name}.tmp-{tag}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(out.parent)
        write(tmp)
        _fsync_tree(tmp)
        if out.is_dir() and not out.is_symlink():
            if keep_others:
                _link_others(out, tmp)
            old = out.parent / f".{out.name}.old-{tag}"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            if out.exists() or out.is_symlink():  # a file the caller was allowed to replace
                out.unlink()
            os.rename(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise os_error(out, e) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
