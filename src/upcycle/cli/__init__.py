"""upcycle: turn a dense causal LM (HF directory or GGUF) into a sparse one, train it, evaluate it, run it."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Each name is a module upcycle.cli.<name> with `add_parser(subparsers)` that sets `func(args) -> int`.
COMMANDS = ("convert", "info", "train", "eval", "export", "demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="upcycle", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"upcycle.cli.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
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
