"""Plain-text corpora to token windows: what calibration and quick evaluations read."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst", ".text")


def read_texts(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Documents from text files or directories of them (recursively; .txt .md .py .rst .text)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    docs = []
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"data path {p} does not exist: pass a text file or a directory of text files.")
        files = sorted(f for f in p.rglob("*") if f.suffix in TEXT_SUFFIXES) if p.is_dir() else [p]
        for f in files:
            docs.append(f.read_text(encoding="utf-8", errors="replace"))
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise ValueError(f"no text found in {[str(p) for p in paths]}: pass non-empty text files.")
    return docs


def token_windows(tokenizer, docs: list[str], seq_len: int, max_windows: int | None = None) -> Tensor:
    """Tokenise `docs` (EOS between documents), cut into non-overlapping [N, seq_len] windows."""
    if tokenizer is None:
        raise ValueError("the checkpoint has no tokenizer: save one next to the model (tokenizer.save_pretrained).")
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    need = None if max_windows is None else max_windows * seq_len
    for doc in docs:
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
        if need is not None and len(ids) >= need:
            break
    n = len(ids) // seq_len
    if n == 0:
        raise ValueError(
            f"the text has {len(ids)} tokens, fewer than one window of {seq_len}: add text or lower seq_len."
        )
    if max_windows is not None:
        n = min(n, max_windows)
    return torch.tensor(ids[: n * seq_len]).reshape(n, seq_len)
