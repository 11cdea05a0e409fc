"""What every benchmark shares: the machine record, interleaved timing, and the result writer.

    record = {"machine": machine_record(device, argv), ...}
    times = time_interleaved({"dense": lambda i: f(x), "sparse": lambda i: g(x)}, device, iters=50)
    stats = quartiles(times["dense"])                       # p25, median, p75, min, n
    write_result("decode_cpu", record, rows, [("provider", "provider"), ("median us", "median_us", ".0f")],
                 "Decode benchmark", notes=["Times are medians of interleaved runs."])

One current file per result name: `write_result` replaces bench/results/<name>.json and .md (and .csv);
the history is git's.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"
REPO = RESULTS.parents[1]
CPU_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_tile")  # what the CPU kernels use


# ---------------------------------------------------------------------------------------------- the machine
def cpu_model() -> dict:
    """{"model": the CPU's name, "flags": those of CPU_FLAGS it has} from /proc/cpuinfo."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    return {"model": model, "flags": [f for f in CPU_FLAGS if f in flags]}


def device_name(device: str | torch.device) -> str:
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()["model"]


def load_average() -> list[float] | None:
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None


def command_line(argv: Sequence[str] | None = None, script: str | None = None) -> str:
    """`python bench/<script> <args>` (argv: the arguments, default sys.argv[1:])."""
    path = Path(script or sys.argv[0]).resolve()
    if path.is_relative_to(REPO):
        path = path.relative_to(REPO)
    return "python " + shlex.join([str(path), *(sys.argv[1:] if argv is None else argv)])


def machine_record(device: str | torch.device, argv: Sequence[str] | None = None, script: str | None = None) -> dict:
    """Where and how a result was measured; `write_result` adds the load average at the end."""
    cpu = cpu_model()
    return {"device": str(device), "device_name": device_name(device), "cpu": cpu["model"], "cpu_flags": cpu["flags"],
            "torch": torch.__version__, "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d %H:%M"),
            "command": command_line(argv, script), "load_average": load_average()}


# ---------------------------------------------------------------------------------------------- timing
def sync(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_interleaved(providers: dict[str, Callable[[int], Any]], device: str | torch.device, iters: int | None = None,
                     budget_s: float = 1.0, min_iters: int = 8, max_iters: int = 400,
                     warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of every provider, timed in one loop: iteration i runs each `fn(i)` once (synced on
    both sides), so a load that drifts on a shared machine slows them alike. `warmup` untimed iterations
    first; then `iters`, or as many as fit `budget_s` (within min_iters..max_iters) at the last warm-up's pace."""
    per_iter = 0.0
    for i in range(max(1, warmup)):
        sync(device)
        t0 = time.perf_counter()
        for fn in providers.values():
            fn(i)
        sync(device)
        per_iter = time.perf_counter() - t0
    if iters is None:
        iters = int(min(max_iters, max(min_iters, budget_s / max(per_iter, 1e-6))))
    times: dict[str, list[float]] = {k: [] for k in providers}
    for i in range(iters):
        for k, fn in providers.items():
            sync(device)
            t0 = time.perf_counter()
            fn(i)
            sync(device)
            times[k].append(time.perf_counter() - t0)
    return times


def abba(runs: dict[str, Callable[[], Any]], reps: int) -> dict[str, list[Any]]:
    """Each run's results over `reps` rounds, the order reversed every other round (A B B A ...): for
    whole-model runs too long to interleave finely, a drifting load then biases no run."""
    out: dict[str, list[Any]] = {k: [] for k in runs}
    for rep in range(reps):
        for k in runs if rep % 2 == 0 else reversed(list(runs)):
            out[k].append(runs[k]())
    return out


def quartiles(values: Sequence[float]) -> dict[str, float]:
    """{"p25", "median", "p75", "min", "n"} (fewer than 4 values: min and max stand in for the quartiles)."""
    v = list(values)
    q = statistics.quantiles(v, n=4) if len(v) >= 4 else [min(v), statistics.median(v), max(v)]
    return {"p25": q[0], "median": statistics.median(v), "p75": q[2], "min": min(v), "n": len(v)}


# ---------------------------------------------------------------------------------------------- results
Column = tuple  # (header, key) | (header, key, format spec) | (header, fn(row) -> str)


@dataclass
class Table:
    """A further markdown section of a result; its rows go to the JSON under `key` (if set)."""

    rows: list[dict]
    columns: list[Column]
    heading: str = ""
    notes: Sequence[str] = ()
    key: str = ""


def _cell(row: dict, col: Column) -> str:
    get = col[1]
    if callable(get):
        return str(get(row))
    value = row.get(get)
    if value is None:
        return ""
    return format(value, col[2]) if len(col) > 2 else str(value)


def markdown_table(rows: list[dict], columns: list[Column]) -> list[str]:
    if not any(c[0] in ("method", "provider") for c in columns):
        raise ValueError("a result table needs a `method` or `provider` column")
    lines = ["| " + " | ".join(c[0] for c in columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(_cell(r, c) for c in columns) + " |" for r in rows]


def _fmt_load(load) -> str:
    return "n/a" if not load else ", ".join(f"{v:.1f}" for v in load)


def machine_line(m: dict) -> str:
    host = m["device_name"] if m["device_name"] == m["cpu"] else f"{m['device_name']} (host {m['cpu']})"
    flags = ", ".join(m["cpu_flags"]) or "none of " + ", ".join(CPU_FLAGS)
    return (f"{host}; CPU flags {flags}; torch {m['torch']}, threads {m['threads']}; {m['date']}; load average "
            f"(1, 5, 15 min) {_fmt_load(m['load_average'])} at start, {_fmt_load(m.get('load_average_end'))} at end.")


def write_result(name: str, record: dict, rows: list[dict], columns: list[Column], title: str,
                 notes: Sequence[str] = (), *, tables: Sequence[Table] = (), out: str | os.PathLike | None = None,
                 csv_rows: bool = False) -> Path:
    """Replace <out>/<name>.json ({**record, "rows" (unless no columns), each table's key, "notes"}) and
    <name>.md (title, command, machine and load, notes, the table of `rows`, then each further table).
    `csv_rows`: also <name>.csv of `rows` (list fields left out), else a stale <name>.csv is removed.
    `record["machine"]` is machine_record's. Returns the path stem."""
    stem = Path(out or RESULTS) / name
    stem.parent.mkdir(parents=True, exist_ok=True)
    machine = record["machine"]
    machine["load_average_end"] = load_average()
    data = {**record, **({"rows": rows} if rows or columns else {}), **{t.key: t.rows for t in tables if t.key},
            "notes": list(notes)}
    stem.with_suffix(".json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    lines = [f"# {title}", "", f"`{machine['command']}`  ", machine_line(machine), ""]
    lines += [p for n in notes for p in (n, "")]
    if rows:
        lines += markdown_table(rows, columns) + [""]
    for t in tables:
        if not t.rows:
            continue
        lines += ([f"## {t.heading}", ""] if t.heading else []) + [p for n in t.notes for p in (n, "")]
        lines += markdown_table(t.rows, t.columns) + [""]
    stem.with_suffix(".md").write_text("\n".join(lines))
    if csv_rows and rows:
        fields = [k for k in rows[0] if not isinstance(rows[0][k], list | dict)]
        with stem.with_suffix(".csv").open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
    else:
        stem.with_suffix(".csv").unlink(missing_ok=True)
    print(f"wrote {stem}.json and .md" + (" and .csv" if csv_rows and rows else ""))
    return stem


