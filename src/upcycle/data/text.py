"""Plain-text files to documents and token windows: what calibration, evaluation and training read."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from upcycle.data.files import TEXT_SUFFIXES, as_paths, read_text_file, resolve_files

SPLITS = ("document", "paragraph", "line")
_PARAGRAPH = re.compile(r"\n\s*\n")


def split_documents(text: str, split: str = "document") -> list[str]:
    """One file's text as documents: the whole file, its blank-line separated paragraphs, or its lines."""
    if split == "document":
        parts = [text]
    elif split == "paragraph":
        parts = _PARAGRAPH.split(text)
    elif split == "line":
        parts = text.splitlines()
    else:
        raise ValueError(f"text_split={split!r} is not one of {SPLITS}.")
    return [p for p in parts if p.strip()]


def iter_documents(files: Sequence[str | os.PathLike], split: str = "document") -> Iterator[str]:
    for f in files:
        yield from split_documents(read_text_file(f), split)


def read_texts(paths: str | os.PathLike | Sequence[str | os.PathLike], split: str = "document") -> list[str]:
    """Documents from text files or directories of them (recursively; .txt .md .py .rst .text)."""
    # named files are read whatever their suffix; directories contribute their text files
    files = [f for group in resolve_files(paths, suffixes=TEXT_SUFFIXES).values() for f in group]
    docs = list(iter_documents(files, split))
    if not docs:
        raise ValueError(f"no text found in {[str(p) for p in as_paths(paths)]}: pass non-empty text files.")
    return docs


def read_text(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> str:
    """The text of one file, or of several joined by a blank line; clear errors for bad paths."""
    paths = as_paths(paths)
    if not paths:
        raise ValueError("no data file given: pass one or more text files.")
    for p in paths:  # in the order given: resolve_files would group them
        resolve_files([p], dirs=False)
    text = "\n\n".join(read_text_file(p) for p in paths)
    if not text.strip():
        raise ValueError(f"data file(s) {', '.join(map(str, paths))} contain no text.")
    return text


def tokenize(tokenizer, text: str) -> Tensor:
    """1-D LongTensor of the whole text's token ids (the tokenizer's default special tokens)."""
    ids = tokenizer(text, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


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
