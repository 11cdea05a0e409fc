"""upcycle: turn a dense causal LM (HF directory or GGUF) into a sparse one, train it, evaluate it, run it."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

# Each name is a module upcycle.cli.<name> with `add_parser(subparsers)` that sets `func(args) -> int`.
COMMANDS = ("convert", "info", "train", "eval", "diagnose", "repair", "export", "generate", "demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="upcycle", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"upcycle.cli.{name}").add_parser(sub)
    return parser


def quiet_libraries() -> None:
    """transformers' and datasets' own progress bars ("Writing model shards", "Generating train split") and
    info logs would interleave with upcycle's: off unless --verbose."""
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    except ImportError:
        pass
    # datasets is imported later (training data) and reads these at import
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("DATASETS_VERBOSITY", "error")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    if not args.verbose:
        quiet_libraries()
    try:
        return args.func(args) or 0
    except (ValueError, FileNotFoundError) as e:
        # Bad input: one clear line naming the fix, not a traceback (use -v for the traceback).
        if args.verbose:
            raise
        print(f"upcycle {args.command}: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        if not hasattr(e, "exit_code") or args.verbose:  # a bug: the traceback is what helps
            raise
        print(f"upcycle {args.command}: stopped: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # permission, read-only, disk full, ...: the path and the cause, in one line
        if args.verbose:
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"upcycle {args.command}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
