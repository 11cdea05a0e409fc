"""`upcycle export --to FORMAT DIR OUT`: write a converted checkpoint in another format its recipe knows
(e.g. an MoE model as a native Hugging Face Mixtral / Qwen2-MoE checkpoint)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a converted checkpoint in another format (e.g. native HF MoE classes)",
                       description="Export a checkpoint written by upcycle to a format of its recipe. "
                       "`--to` choices depend on the recipe; `upcycle export DIR` lists them.")
    p.add_argument("model", metavar="DIR", help="checkpoint written by upcycle")
    p.add_argument("out", metavar="OUT", nargs="?", help="output directory (refused if it holds other files, "
                   "unless --overwrite)")
    p.add_argument("--to", default=None, metavar="FORMAT",
                   help="the format to write (without it: list the formats of the checkpoint's recipe)")
    p.add_argument("--overwrite", action="store_true", help="write OUT even if it holds other files (kept)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import upcycle
    from upcycle.data.tokenizer import load_tokenizer
    from upcycle.fsutil import check_output
    from upcycle.recipes import registry

    model = upcycle.load(args.model)
    recipe = registry.for_model(model)
    if recipe is None:
        raise ValueError(f"{args.model} is a dense checkpoint: there is nothing to export (it already is plain "
                         "transformers).")
    formats = sorted(recipe.exporters)
    if not args.to or not args.out:
        if not formats:
            raise ValueError(f"recipe {recipe.name} exports to no other format: its checkpoint loads with "
                             "upcycle.load (or AutoModelForCausalLM after `import upcycle`).")
        print(f"{args.model} ({recipe.name}) exports to: {', '.join(formats)} (upcycle export --to NAME DIR OUT)")
        return 0 if not args.to else 2
    if args.to not in recipe.exporters:
        choices = ", ".join(formats) or "-"
        raise ValueError(f"recipe {recipe.name} cannot export to {args.to!r}: choose one of {choices}.")
    check_output(args.out, args.overwrite, inputs=[args.model])
    try:
        tokenizer = load_tokenizer(args.model)
    except ValueError:
        tokenizer = None
    out = recipe.exporters[args.to](model, args.out, tokenizer)
    print(f"exported {args.model} as {args.to}: {out}")
    return 0
