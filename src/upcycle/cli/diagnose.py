"""`upcycle diagnose`: which layer's sparsity breaks a long-context task, at which lengths."""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

DESCRIPTION = """\
Score a RULER task per length for the dense reference, the bank-sparse model, and the sparse model with one
layer at a time made dense (keep = bank size in that layer), to find the layer(s) whose sparsity loses the
score and the length range where it happens.

A cheap screen runs first, inside the sparse model's own evaluation: per layer and position bucket
([0, 1K), [1K, 2K), [2K, 4K), ... tokens) the share of the dense |h| mass kept, the recall of the oracle
top-k channels, the FFN output's relative error and the KL of the layer's output contribution read through
the LM head. The full sweep makes dense only the --sweep layers the screen ranks worst (or --layers); the
others count as cleared. Output: a table on stdout, OUT/diagnosis.json (everything: scores per layer and
length, the screen, predictions), OUT/heatmap.png (layer x length, score recovered) and a verdict."""

EPILOG = """\
examples:
  upcycle diagnose --model sparse --reference dense --task cwe --lengths 1024,2048,4096,8192 --samples 3 --out diag
  upcycle diagnose --model sparse --task passkey --lengths 1024,4096,8192 --layers 3,17 --out diag-passkey
  upcycle repair --model sparse --layer auto --diagnosis diag --method keep --keep 32 --out repaired"""


def add_parser(subparsers) -> None:
    from upcycle.cli.eval import add_rope_arguments
    from upcycle.eval.tasks import ALIASES, TASKS

    p = subparsers.add_parser("diagnose", help="per-layer diagnosis of a long-context task on a bank-sparse model",
                              description=DESCRIPTION, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, metavar="SPARSE",
                   help="bank-sparse checkpoint (from upcycle convert/train)")
    p.add_argument("--reference", metavar="DENSE", help="dense reference checkpoint (default: the sparse model's own "
                   "dense form, i.e. the same weights with dense FFNs)")
    p.add_argument("--task", default="cwe", help=f"RULER task (default cwe): {', '.join(TASKS)}; aliases "
                   f"{', '.join(ALIASES)}")
    p.add_argument("--lengths", default="1024,2048,4096,8192", metavar="LIST",
                   help="comma-separated lengths in tokens (%(default)s)")
    p.add_argument("--samples", type=int, default=3, help="samples per length (default 3)")
    p.add_argument("--seed", type=int, default=42, help="task generation seed (default 42, RULER's)")
    p.add_argument("--sweep", default="3", metavar="N|all", help="layers the full sweep makes dense, the screen's "
                   "worst first (default 3; 'all': every layer)")
    p.add_argument("--layers", metavar="LIST", help="sweep exactly these layers (skips the screen's choice)")
    p.add_argument("--kl-positions", type=int, default=32, metavar="N", help="positions per bucket for the screen's "
                   "KL (default 32; 0: no KL)")
    p.add_argument("--min-gap", type=float, default=0.05, help="smallest dense - sparse gap that counts as a loss "
                   "(%(default)s)")
    p.add_argument("--rank-by", default="kl", choices=("kl", "resid_rel", "rel_err", "mass_lost"),
                   help="screen metric that picks the swept layers (default kl)")
    p.add_argument("--haystack", nargs="+", metavar="PATH", help="essay text for the essay-haystack tasks")
    add_rope_arguments(p)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype to load the weights in (%(default)s: the checkpoint's own)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    p.add_argument("--out", required=True, metavar="DIR", help="directory for diagnosis.json and heatmap.png")
    p.add_argument("--overwrite", action="store_true", help="write into an --out that holds other files")
    p.add_argument("--json", action="store_true", help="print the diagnosis JSON on stdout instead of the table")
    p.set_defaults(func=run)


OUTPUT_FILES = ("diagnosis.json", "heatmap.png")


def check_out_dir(out: str, overwrite: bool, inputs: tuple[str, ...], files: tuple[str, ...]) -> Path:
    """A directory to write `files` into: new, empty, holding only those files, or any with --overwrite."""
    from upcycle.fsutil import OutputError

    path = Path(out)
    resolved = path.resolve()
    for inp in inputs:
        src = Path(inp).resolve()
        if resolved == src or src in resolved.parents:
            raise OutputError(f"--out {out} is inside the input {inp}: pass another directory.")
    if resolved.exists() and not resolved.is_dir():
        raise OutputError(f"--out {out} is an existing file: pass a directory.")
    if resolved.is_dir() and not overwrite:
        extra = sorted(e.name for e in resolved.iterdir() if e.name not in files)
        if extra:
            raise OutputError(f"--out {out} holds other files ({', '.join(extra[:5])}): choose another directory or "
                              "pass --overwrite (other files are kept).")
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def load_pair(args, sparse_path: str, reference: str | None):
    """(sparse model, reference model, tokenizer) on the requested device and dtype, RoPE settings applied."""
    import copy

    import torch

    import upcycle
    from upcycle import hf
    from upcycle.data import load_tokenizer
    from upcycle.recipes.layer_repair.diagnose import check_dense, sparse_layers

    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    sparse = upcycle.load(sparse_path, dtype=dtype, device=device).eval()
    sparse_layers(sparse, f"--model {sparse_path}")
    tok = load_tokenizer(sparse_path)
    if reference:
        ref = upcycle.load(reference, dtype=dtype, device=device).eval()
        check_dense(ref, f"--reference {reference}")
        if ref.config.vocab_size != sparse.config.vocab_size:
            raise ValueError(f"--reference {reference} has vocabulary {ref.config.vocab_size}, the sparse model "
                             f"{sparse.config.vocab_size}: pass the dense model of the same tokenizer.")
    else:
        ref = upcycle.to_dense(copy.deepcopy(sparse)).eval()
    for m in (sparse, ref):
        hf.set_rope(m, None, args.rope_scaling, args.max_position_embeddings)
    return sparse, ref, tok


def parse_sweep(text: str) -> int | None:
    if text.strip() == "all":
        return None
    try:
        n = int(text)
    except ValueError:
        raise ValueError(f"--sweep must be a number of layers or 'all', got {text!r}.") from None
    if n < 0:
        raise ValueError(f"--sweep must be >= 0, got {n}.")
    return n


def run(args: argparse.Namespace) -> int:
    import torch

    from upcycle.cli.eval import _ints
    from upcycle.data import read_text
    from upcycle.eval.tasks import resolve
    from upcycle.recipes.layer_repair.diagnose import check_layers, diagnose, format_table, heatmap

    if args.samples < 1:
        raise ValueError(f"--samples must be >= 1, got {args.samples}.")
    if args.kl_positions < 0:
        raise ValueError(f"--kl-positions must be >= 0, got {args.kl_positions}.")
    resolve(args.task)
    lengths = _ints(args.lengths, "--lengths")
    sweep = parse_sweep(args.sweep)
    layers = None
    if args.layers:
        try:
            layers = [int(v) for v in args.layers.split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"--layers must be comma-separated layer indices, got {args.layers!r}.") from None
    inputs = tuple(p for p in (args.model, args.reference) if p)
    out = check_out_dir(args.out, args.overwrite, inputs, OUTPUT_FILES)
    if args.threads:
        torch.set_num_threads(args.threads)
    sparse, ref, tok = load_pair(args, args.model, args.reference)
    if layers is not None:
        check_layers(layers, sparse)
    haystack = read_text(args.haystack) if args.haystack else None
    meta = {"model": str(args.model), "reference": str(args.reference) if args.reference else
            f"{args.model} (its dense form)", "rope_scaling": args.rope_scaling, "device": str(
                next(sparse.parameters()).device), "threads": torch.get_num_threads()}

    def save(result: dict) -> None:
        write_json(out / "diagnosis.json", {**meta, **result})

    result = diagnose(sparse, ref, tok, args.task, lengths, args.samples, args.seed, haystack, sweep, layers,
                      args.kl_positions, args.min_gap, on_update=save, rank_by=args.rank_by)
    result = {**meta, **result}
    drew = heatmap(result, out / "heatmap.png")
    result["heatmap"] = str(out / "heatmap.png") if drew else None
    save(result)
    if args.json:
        print(json.dumps(result, indent=1, default=str))
    else:
        print(format_table(result))
        print(f"\nwrote {out / 'diagnosis.json'}" + (f" and {out / 'heatmap.png'}" if drew else ""))
    return 0
