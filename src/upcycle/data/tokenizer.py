"""The one tokenizer loader: a checkpoint directory's (or a GGUF file's) tokenizer, or a message naming the fix."""

from __future__ import annotations

import os
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
FIX = "save the tokenizer with the checkpoint (tokenizer.save_pretrained(DIR)) or pass --tokenizer PATH."


def load_tokenizer(model_dir: str | os.PathLike, tokenizer: str | os.PathLike | None = None):
    """The checkpoint's tokenizer (or the one at `tokenizer`); ValueError saying what to do if none."""
    from transformers import AutoTokenizer

    src = Path(tokenizer or model_dir)
    if not src.exists():
        raise ValueError(f"{src} does not exist: no tokenizer to load; {FIX}")
    # transformers 5 builds an empty tokenizer from config.json alone: require the tokenizer's own files
    if src.is_dir() and not any((src / f).exists() for f in TOKENIZER_FILES):
        raise ValueError(f"{src} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}): {FIX}")
    try:
        if src.suffix == ".gguf":  # the tokenizer travels inside the GGUF file
            tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
        else:
            tok = AutoTokenizer.from_pretrained(src)
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(f"no usable tokenizer in {src} ({type(e).__name__}: {first}): {FIX}") from e
    if len(tok) < 2:
        raise ValueError(f"the tokenizer in {src} has {len(tok)} token(s): {FIX}")
    return tok
