"""Build a C kernel shipped as package data (`csrc/*.c`, `*.h`) on first use, cached by a hash.

The system C compiler builds the shared library (about a second; a torch C++ extension takes a minute)
with -O3 -march=native into ~/.cache/upcycle/kernels (or $UPCYCLE_CACHE). The cache key hashes the
sources, the compiler, the flags and this CPU's model and feature flags, so a home directory shared by
machines with different CPUs never loads a library built for another one. A compile error names the
package's file and line. UPCYCLE_KERNEL_SANITIZE=1 builds with -fsanitize=address,undefined instead
(run the process with libasan preloaded: see tests/kernels/cpu/test_sanitize.py).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from importlib import resources
from pathlib import Path

CFLAGS = ["-O3", "-shared", "-fPIC", "-pthread", "-fno-math-errno", "-std=gnu11"]
SANITIZE_FLAGS = ["-O1", "-g", "-shared", "-fPIC", "-pthread", "-fno-math-errno", "-std=gnu11",
                  "-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined"]


log = logging.getLogger(__name__)


class CompileError(RuntimeError):
    """The C compiler rejected a kernel source (the message names the file and line)."""


def cache_dir() -> Path:
    root = os.environ.get("UPCYCLE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "upcycle"
    )
    return Path(root) / "kernels"


def sanitizing() -> bool:
    return os.environ.get("UPCYCLE_KERNEL_SANITIZE", "") not in ("", "0")


def arch_flags() -> list[str]:
    # -march=native tunes to this CPU; the cache key includes the CPU so a shared home stays safe.
    return ["-march=native"] if platform.machine() in ("x86_64", "AMD64", "aarch64", "arm64") else []


def cpu_id() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags", "Features"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


def compiler() -> str | None:
    cc = os.environ.get("CC")
    if cc and shutil.which(cc):
        return cc
    for name in ("gcc", "cc", "clang"):
        if shutil.which(name):
            return name
    return None


def source_dir() -> resources.abc.Traversable:
    return resources.files("upcycle.kernels.cpu") / "csrc"


def _sources() -> dict[str, str]:
    return {f.name: f.read_text() for f in source_dir().iterdir() if f.name.endswith((".c", ".h"))}


def build(main: str, name: str) -> ctypes.CDLL:
    """Compile csrc/`main` (with the other csrc files available to #include) and load it."""
    cc = compiler()
    if cc is None:
        raise RuntimeError("no C compiler (gcc, cc or clang) on PATH")
    sources = _sources()
    if main not in sources:
        raise FileNotFoundError(f"{main} is not in {source_dir()}")
    flags = (SANITIZE_FLAGS if sanitizing() else CFLAGS) + arch_flags()
    blob = "\0".join([*(f"{k}\0{v}" for k, v in sorted(sources.items())), cc, *flags, cpu_id(), platform.machine()])
    key = hashlib.sha256(blob.encode()).hexdigest()[:16]
    so = cache_dir() / f"{name}_{key}{'_asan' if sanitizing() else ''}.so"
    if not so.exists():
        _compile(cc, flags, sources, main, so)
    return ctypes.CDLL(str(so))


def _compile(cc: str, flags: list[str], sources: dict[str, str], main: str, so: Path) -> None:
    so.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=so.parent) as tmp:
        for fname, text in sources.items():
            (Path(tmp) / fname).write_text(text)
        tmp_so = Path(tmp) / "kernel.so"
        proc = subprocess.run([cc, *flags, main, "-o", str(tmp_so)], capture_output=True, text=True, cwd=tmp)
        if proc.returncode != 0:
            # "bank_sparse_decode.c:123:5: error: ..." -> the package's path, so the message names the file
            where = str(source_dir())
            text = re.sub(rf"(^|\s|/){re.escape(tmp)}/", r"\1", proc.stderr)
            text = re.sub(r"(^|\n)([\w.]+\.[ch]):(\d+)", lambda m: f"{m.group(1)}{where}/{m.group(2)}:{m.group(3)}",
                          text)
            raise CompileError(f"{cc} could not compile {where}/{main}:\n{text.strip()[-3000:]}")
        os.replace(tmp_so, so)  # atomic: concurrent builders never see a partial file


class LazyLibrary:
    """A kernel library built on the first `get()` (thread-safe, once); `get()` then returns it, or None when the
    build failed, with the reason in `error` and logged once: a missing or broken compiler only costs speed."""

    def __init__(self, builder: Callable[[], ctypes.CDLL], what: str, fallback: str):
        self._builder, self._what, self._fallback = builder, what, fallback
        self._lock = threading.Lock()
        self.lib: ctypes.CDLL | None = None
        self.error: str | None = None

    def get(self) -> ctypes.CDLL | None:
        if self.lib is not None or self.error is not None:
            return self.lib
        with self._lock:
            if self.lib is None and self.error is None:
                try:
                    self.lib = self._builder()
                except Exception as e:  # any build failure falls back to the torch path
                    self.error = f"{type(e).__name__}: {e}"
                    log.warning("upcycle: %s unavailable (%s); %s.", self._what, self.error, self._fallback)
        return self.lib
