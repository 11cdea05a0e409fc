"""What this CPU can run, read at run time: the model name and the SIMD / matrix extensions the kernels choose by.

    features = cpu_features()          # {"model_name": ..., "machine": "x86_64", "avx2": True, "avx512_vnni": ...}
    dot_paths()                        # the shadow-scoring dot paths this CPU supports, best first

The C kernels are built with -march=native per CPU (build.py keys the cache on the CPU's flags) and pick
among the code paths compiled in by these same features at every call, so a forced path (`use_kernels(
shadow_dots=...)`) can be A/B-tested and every path this CPU supports can be tested. Reads
/proc/cpuinfo (Linux); elsewhere every flag is False except NEON on 64-bit ARM, where it is mandatory.
"""

from __future__ import annotations

import functools
import platform

X86_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16",
             "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")
ARM_FLAGS = ("neon", "asimd", "asimddp", "sve", "i8mm", "bf16")

# Shadow-scoring dot paths of the fused CPU kernel, best first, with the CPU features each needs. "float" (float
# dots of the unpacked codes) runs everywhere; the integer paths quantise x per group to int16 (see
# kernels/cpu/csrc/bank_sparse_decode.c): AVX2 `vpmaddwd`, AVX-VNNI (256-bit `vpdpwssd`), AVX-512-VNNI
# (512-bit `vpdpwssd`), and split-int8 forms of the two VNNI paths (`vpdpbusd`: x as hi * 128 + lo bytes).
DOT_PATHS = {
    "avx512vnni8": ("avx512f", "avx512bw", "avx512vl", "avx512_vnni"),
    "avxvnni8": ("avx2", "avx_vnni"),
    "avx512vnni": ("avx512f", "avx512bw", "avx512vl", "avx512_vnni"),
    "avxvnni": ("avx2", "avx_vnni"),
    "avx2": ("avx2",),
    "float": (),
}
# ...8: the split-int8 forms (`vpdpbusd`, x as two int8 halves of 15 bits), shadow scoring only.
SPLIT_PATHS = ("avx512vnni8", "avxvnni8")
# The C kernel's numbering of the paths (upc_decode_args.dot_path); 0 = choose automatically.
DOT_PATH_IDS = {"auto": 0, "float": 1, "avx2": 2, "avxvnni": 3, "avx512vnni": 4, "avxvnni8": 5, "avx512vnni8": 6}


def parse_cpuinfo(text: str, machine: str | None = None) -> dict[str, bool | str]:
    """The features of a /proc/cpuinfo text (the first CPU's flags and model name)."""
    machine = platform.machine() if machine is None else machine
    feats: dict[str, bool | str] = dict.fromkeys(X86_FLAGS + ARM_FLAGS, False)
    name, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("flags", "features") and not flags:  # x86 "flags", ARM "Features"
            flags = set(value.lower().split())
        elif key in ("model name", "cpu model", "hardware") and not name:
            name = value.strip()
    for flag in X86_FLAGS + ARM_FLAGS:
        feats[flag] = flag in flags
    if machine.lower() in ("aarch64", "arm64"):
        feats["neon"] = feats["asimd"] = True
    feats["model_name"] = name or platform.processor() or machine or "unknown"
    feats["machine"] = machine
    return feats


@functools.lru_cache(maxsize=1)
def cpu_features(cpuinfo_path: str = "/proc/cpuinfo") -> dict[str, bool | str]:
    """This CPU's model name, machine and feature flags (all False when /proc/cpuinfo cannot be read)."""
    try:
        with open(cpuinfo_path, errors="replace") as f:
            text = f.read()
    except OSError:
        text = ""
    return parse_cpuinfo(text)


def has(*flags: str) -> bool:
    feats = cpu_features()
    return all(feats.get(f) is True for f in flags)


def dot_path_supported(path: str) -> bool:
    """Whether this CPU has the features of shadow dot path `path` (one of DOT_PATHS)."""
    return path in DOT_PATHS and (platform.machine() in ("x86_64", "AMD64") or not DOT_PATHS[path]) and has(
        *DOT_PATHS[path])


def dot_paths() -> list[str]:
    """The dot paths this CPU supports, widest first (float last)."""
    return [p for p in DOT_PATHS if dot_path_supported(p)]


# What `auto` prefers, by kernel (the C kernel's SHADOW_ORDER / LINEAR_ORDER, measured: see bank_sparse_decode.c):
# the shadow's dots are bound by unpacking its codes, where 512-bit lanes cost more than they save; the int8
# linear's plain byte rows gain from them.
AUTO_ORDER = {"shadow": ("avxvnni", "avx2", "avx512vnni", "float"),
              "int8": ("avx512vnni", "avxvnni", "avx2", "float"),
              "int4": ("avxvnni", "avx2", "avx512vnni", "float")}  # 4-bit rows: the shadow's dots (upc_q4_dot_path)


def auto_path(kernel: str) -> str:
    """The path `auto` runs for `kernel` ("shadow", "int8" or "int4") on this CPU."""
    return next(p for p in AUTO_ORDER[kernel] if dot_path_supported(p))


def missing(path: str) -> list[str]:
    """The CPU features path `path` needs that this CPU lacks (for skip messages)."""
    feats = cpu_features()
    return [f for f in DOT_PATHS.get(path, ()) if feats.get(f) is not True]


# ---------------------------------------------------------------------------------------------- dispatch record
# kernel -> the path its last call ran (e.g. "bank_sparse.shadow_dots" -> "avx512vnni"), written by the wrappers.
DISPATCH: dict[str, str] = {}


def record(kernel: str, path: str) -> None:
    """Note the path `kernel` ran (cheap: a dict store per call)."""
    DISPATCH[kernel] = path
