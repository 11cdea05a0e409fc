"""The C kernels built with -fsanitize=address,undefined pass the kernel tests (run once, in a subprocess).

Python itself is not instrumented, so the sanitizer runtimes are preloaded into the child process; the
kernel is rebuilt with UPCYCLE_KERNEL_SANITIZE=1 into its own cache. An out-of-bounds read or write, a
use after free or undefined behaviour (shifts, overflow, misaligned access) aborts the child.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from upcycle.kernels.cpu import build

HERE = Path(__file__).parent


def _runtime(name: str) -> str | None:
    cc = build.compiler()
    if cc is None:
        return None
    path = subprocess.run([cc, f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
    return path if os.path.isabs(path) and os.path.exists(path) else None


@pytest.mark.skipif(_runtime("libasan.so") is None, reason="no C compiler with AddressSanitizer (libasan)")
def test_kernel_tests_pass_under_address_and_undefined_behaviour_sanitizers(tmp_path):
    preload = " ".join(p for p in (_runtime("libasan.so"), _runtime("libubsan.so")) if p)
    env = {**os.environ, "LD_PRELOAD": preload, "UPCYCLE_KERNEL_SANITIZE": "1", "UPCYCLE_CACHE": str(tmp_path),
           "ASAN_OPTIONS": "detect_leaks=0:halt_on_error=1:abort_on_error=1",
           "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", str(HERE / "test_decode.py"),
           str(HERE / "test_nm_decode.py"), str(HERE / "test_int4.py")]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert any(f.name.endswith("_asan.so") for f in (tmp_path / "kernels").iterdir())  # the sanitized build ran


def test_a_compile_error_names_the_file_and_line(tmp_path, monkeypatch):
    src = tmp_path / "csrc"
    src.mkdir()
    (src / "broken.c").write_text("int ok(void) { return 0; }\nint bad(void) { return undefined_name; }\n")
    monkeypatch.setattr(build, "source_dir", lambda: src)
    monkeypatch.setenv("UPCYCLE_CACHE", str(tmp_path / "cache"))
    if build.compiler() is None:
        pytest.skip("no C compiler")
    with pytest.raises(build.CompileError, match=rf"{src}/broken\.c:2:\d+: error"):
        build.build("broken.c", "broken")


def test_lazy_library_builds_once_and_a_failed_build_only_costs_speed(caplog):
    calls = []

    def broken():
        calls.append(1)
        raise build.CompileError("no.c:1:1: error: nope")

    lazy = build.LazyLibrary(broken, "test kernel", "running the torch path")
    with caplog.at_level("WARNING"):
        assert lazy.get() is None and lazy.get() is None
    assert calls == [1]  # tried once, not on every call
    assert lazy.error.startswith("CompileError") and "nope" in lazy.error
    assert sum("test kernel unavailable" in r.message for r in caplog.records) == 1

    sentinel = object()
    ok = build.LazyLibrary(lambda: calls.append(2) or sentinel, "ok kernel", "-")
    assert ok.get() is sentinel and ok.get() is sentinel and ok.error is None and calls == [1, 2]
