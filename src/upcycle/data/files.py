"""Which local files a data argument names, and reading one as text (refusing binary or non-UTF-8 files)."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst", ".py")
JSON_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
ALL_SUFFIXES = TEXT_SUFFIXES + JSON_SUFFIXES + PARQUET_SUFFIXES

# A text file may hold a few undecodable bytes (a stray Latin-1 character): replaced and warned about. More
# than this fraction of characters replaced, or control bytes of binary data, and the file is refused.
MAX_BAD_FRACTION = 1e-3
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f]")


def as_paths(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    return [Path(p) for p in paths]


def kind_of(f: Path) -> str:
    return "json" if f.suffix in JSON_SUFFIXES else "parquet" if f.suffix in PARQUET_SUFFIXES else "text"


def resolve_files(paths: str | os.PathLike | Sequence[str | os.PathLike], suffixes: tuple[str, ...] = ALL_SUFFIXES,
                  dirs: bool = True) -> dict[str, list[str]]:
    """{'text'|'json'|'parquet': files}; directories are searched recursively by suffix (`dirs=False`: refused)."""
    groups: dict[str, list[str]] = {"text": [], "json": [], "parquet": []}
    for p in as_paths(paths):
        if not p.exists():
            raise FileNotFoundError(f"data path {p} does not exist: pass text/.jsonl/.parquet files or directories.")
        if p.is_dir():
            if not dirs:
                raise ValueError(f"{p} is a directory: pass the text file(s) inside it.")
            files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in suffixes)
            if not files:
                raise ValueError(f"directory {p} holds no {suffixes} files.")
        else:
            files = [p]
        for f in files:
            groups[kind_of(f)].append(str(f.resolve()))
    return {k: v for k, v in groups.items() if v}


def read_text_file(path: str | os.PathLike, limit: int | None = None) -> str:
    """The UTF-8 text of `path` (its first `limit` bytes: a sniff of a large file); ValueError naming the file
    when it is binary or not UTF-8 text."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read(-1 if limit is None else limit)
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror or e}.") from e
    text = data.decode("utf-8", errors="replace")
    if limit is not None and len(data) == limit:
        text = text[:-4]  # a multi-byte character cut by the limit is not an error
    if not text:
        return text
    bad = text.count("\ufffd")
    controls = len(_CONTROL.findall(text[:1 << 20]))
    if controls > MAX_BAD_FRACTION * min(len(text), 1 << 20) or bad > MAX_BAD_FRACTION * len(text):
        why = f"{controls} control bytes" if controls else f"{bad} of {len(text)} characters are not UTF-8"
        raise ValueError(f"{path} is not UTF-8 text ({why}; binary data?): pass text files (.txt, .md, .jsonl, "
                         ".parquet) encoded as UTF-8.")
    if bad:
        log.warning("%s: %d byte sequence(s) are not UTF-8 and were replaced", path, bad)
    return text
