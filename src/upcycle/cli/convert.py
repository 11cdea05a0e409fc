"""`upcycle convert`: dense HF checkpoint (or GGUF file) -> a converted checkpoint, with the tokenizer carried along."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger("upcycle")


def add_parser(sub: argparse._SubParsersAction) -> None:
    from upcycle.recipes import registry

    recipes = [r for r in registry.load_all() if r.cli is not None]
    p = sub.add_parser(
        "convert", help="convert a dense SwiGLU checkpoint with a recipe (default: bank-sparse)",
        description="Convert a dense checkpoint in place of its FFNs and save it (atomically) with its tokenizer. "
        "Recipes: " + "; ".join(f"{r.name}: {r.summary}" for r in recipes) + ".",
    )
    p.add_argument("--model", required=True, help="local checkpoint directory saved by transformers, or a .gguf file")
    p.add_argument("--out", required=True, help="output directory (written atomically; a previous checkpoint there "
                   "is replaced, anything else refused without --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="write --out even if it holds other files (they are kept) "
                   "or is a file (it is replaced)")
    p.add_argument("--recipe", default="bank_sparse", choices=[r.name for r in recipes],
                   help="how to sparsify (%(default)s); each recipe's flags are listed under it below")
    p.add_argument("--seed", type=int, default=0, help="seed of any random initialisation (%(default)s)")
    for r in recipes:
        r.cli.add_convert_arguments(p.add_argument_group(f"{r.name} recipe (--recipe {r.name})", r.summary))
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    import upcycle
    from upcycle import format as fmt
    from upcycle.fsutil import check_output
    from upcycle.io import load_pretrained
    from upcycle.recipes import registry

    check_output(args.out, args.overwrite, inputs=[args.model])  # before minutes of loading and converting
    torch.manual_seed(args.seed)
    recipe = registry.get(args.recipe)
    config = recipe.cli.config_from_args(args)  # bad flags fail before a large model loads
    model, tokenizer = load_pretrained(args.model)
    if tokenizer is None:
        log.warning("no tokenizer in %s: the output will have none (train/eval need one)", args.model)
    recipe.cli.convert_from_args(args, config, model, tokenizer)
    getattr(model.config, fmt.KEY)["source"] = str(Path(args.model).resolve())
    out = upcycle.save(model, args.out, tokenizer=tokenizer, overwrite=args.overwrite, inputs=(args.model,))
    print(f"saved {out}")
    return 0
