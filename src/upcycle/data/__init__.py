"""Data: which files an argument names (`files`), plain text to documents and token windows (`text`), the
tokenizer of a checkpoint (`tokenizer`), and packed, resumable training batches (`packing`, needs `datasets`)."""

from upcycle.data.files import read_text_file, resolve_files
from upcycle.data.text import read_text, read_texts, split_documents, token_windows, tokenize
from upcycle.data.tokenizer import load_tokenizer

__all__ = ["load_tokenizer", "read_text", "read_text_file", "read_texts", "resolve_files", "split_documents",
           "token_windows", "tokenize"]
