"""`upcycle repair`: repair one layer of a bank-sparse model (raise its keep, re-fit it, or make it dense)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

DESCRIPTION = """\
Repair one layer of a bank-sparse model and save a normal checkpoint (the layer's keep in the recipe's
keep_per_layer; the repair recorded under "repairs" in config.json's upcycle entry).

  --method keep    the layer keeps --keep K of every bank (default: twice the model's keep)
  --method dense   the layer keeps every channel (keep = bank size)
  --method refit   layer-local: the dense reference runs on --data text in windows of --seq-len tokens, the
                   layer's FFN inputs and outputs are captured, and that layer alone (FFN weights and routing)
                   is trained to reproduce the dense output under its hard mask; no full-model backward; the
                   keep stays (or becomes --keep), so it costs no density

--layer auto takes the layer the diagnosis (upcycle diagnose --out DIR) found worst; pass --diagnosis DIR.
The task score per length is measured before and after (task, lengths, samples and seed from the diagnosis,
or --task/--lengths), and the whole-model FFN density cost is reported."""

EPILOG = """\
examples:
  upcycle repair --model sparse --layer auto --diagnosis diag --method keep --keep 32 --out repaired
  upcycle repair --model sparse --layer 17 --method refit --data long.txt --reference dense --out refit17
  upcycle repair --model sparse --layer 17 --method dense --task cwe --lengths 4096,8192 --out dense17"""


def add_parser(subparsers) -> None:
    from upcycle.cli.eval import add_rope_arguments

    p = subparsers.add_parser("repair", help="repair one layer of a bank-sparse model (keep, refit or dense)",
                              description=DESCRIPTION, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, metavar="SPARSE", help="bank-sparse checkpoint")
    p.add_argument("--layer", required=True, metavar="N|auto", help="decoder layer to repair, or 'auto' (the "
                   "diagnosis' worst layer)")
    p.add_argument("--method", required=True, choices=("keep", "refit", "dense"),
                   help="keep: raise the layer's keep; dense: keep every channel; refit: train the layer alone to "
                   "match the dense output (see above)")
    p.add_argument("--keep", type=int, default=None, metavar="K", help="channels kept per bank in that layer (keep: "
                   "default twice the model's keep; refit: default unchanged)")
    p.add_argument("--diagnosis", metavar="DIR|JSON", help="upcycle diagnose's output (for --layer auto and the "
                   "before scores)")
    p.add_argument("--reference", metavar="DENSE", help="dense reference (default: the sparse model's dense form)")
    g = p.add_argument_group("refit")
    g.add_argument("--data", nargs="+", metavar="LONG_TEXT", help="long-context text files for --method refit")
    g.add_argument("--seq-len", type=int, default=4096, help="window length of the captured activations (4096)")
    g.add_argument("--refit-tokens", type=int, default=32768, metavar="N", help="tokens captured (default 32768)")
    g.add_argument("--steps", type=int, default=300, help="refit optimisation steps (default 300)")
    g.add_argument("--lr", type=float, default=1e-4,
                   help="refit learning rate of the FFN weights, routing x10 (%(default)s)")
    g.add_argument("--batch-tokens", type=int, default=2048, help="tokens per refit step (default 2048)")
    e = p.add_argument_group("evaluation before / after")
    e.add_argument("--task", default=None, help="RULER task (default: the diagnosis's)")
    e.add_argument("--lengths", default=None, metavar="LIST", help="task lengths in tokens (default: the diagnosis's)")
    e.add_argument("--samples", type=int, default=None, help="samples per length (default: the diagnosis's, else 3)")
    e.add_argument("--seed", type=int, default=None, help="task seed (default: the diagnosis's, else 42)")
    e.add_argument("--haystack", nargs="+", metavar="PATH", help="essay text for the essay-haystack tasks")
    e.add_argument("--no-eval", action="store_true", help="skip the before / after scores")
    add_rope_arguments(p)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype to load the weights in (%(default)s: the checkpoint's own)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    p.add_argument("--out", required=True, metavar="DIR", help="the repaired checkpoint")
    p.add_argument("--overwrite", action="store_true", help="write into an --out that holds other files")
    p.add_argument("--report", metavar="PATH", help="also write the report as JSON here")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


def read_diagnosis(path: str) -> dict:
    p = Path(path)
    if p.is_dir():
        p = p / "diagnosis.json"
    if not p.is_file():
        raise FileNotFoundError(f"--diagnosis {path}: no diagnosis.json there: run upcycle diagnose --out DIR first.")
    try:
        d = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"--diagnosis {p} is not valid JSON ({e}): run upcycle diagnose again.") from None
    for key in ("task", "lengths", "sparse"):
        if key not in d:
            raise ValueError(f"--diagnosis {p} is not a complete diagnosis (no {key!r}): was the run interrupted?")
    return d


def resolve_layer(text: str, diagnosis: dict | None) -> int:
    if text == "auto":
        if diagnosis is None:
            raise ValueError("--layer auto needs --diagnosis DIR (the output of upcycle diagnose).")
        layer = diagnosis.get("best_layer")
        if layer is None:
            raise ValueError(f"the diagnosis found no layer to repair ({diagnosis.get('verdict', 'no verdict')}): pass "
                             "--layer N.")
        return int(layer)
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"--layer must be a layer index or 'auto', got {text!r}.") from None


def token_windows(tokenizer, paths, seq_len: int, n_tokens: int):
    from upcycle.data import read_text, tokenize

    ids = tokenize(tokenizer, read_text(paths))
    rows = min(n_tokens, len(ids)) // seq_len
    if rows < 1:
        raise ValueError(f"--data has {len(ids)} tokens: refit needs at least one window of --seq-len {seq_len} "
                         "(pass more text or a shorter --seq-len).")
    return ids[: rows * seq_len].reshape(rows, seq_len)


def run(args: argparse.Namespace) -> int:
    import torch

    import upcycle
    from upcycle.cli.diagnose import load_pair, write_json
    from upcycle.cli.eval import _ints
    from upcycle.data import read_text
    from upcycle.eval.tasks import DEFAULT_SEED, check_lengths, generate, resolve
    from upcycle.fsutil import check_output
    from upcycle.recipes.layer_repair.diagnose import check_layers, score_lengths
    from upcycle.recipes.layer_repair.repair import repair

    diagnosis = read_diagnosis(args.diagnosis) if args.diagnosis else None
    layer = resolve_layer(args.layer, diagnosis)
    if args.method == "refit" and not args.data:
        raise ValueError("--method refit needs long-context text: pass --data FILE (windows of --seq-len tokens).")
    if args.method == "dense" and args.keep is not None:
        raise ValueError("--keep does not apply to --method dense (it keeps every channel).")
    for name in ("seq_len", "refit_tokens", "steps", "batch_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}.")
    if not args.lr > 0:
        raise ValueError(f"--lr must be > 0, got {args.lr}.")
    task = args.task or (diagnosis or {}).get("task")
    lengths = _ints(args.lengths, "--lengths") if args.lengths else (diagnosis or {}).get("lengths")
    samples = args.samples or (diagnosis or {}).get("samples") or 3
    seed = args.seed if args.seed is not None else (diagnosis or {}).get("seed", DEFAULT_SEED)
    evaluate = not args.no_eval and task is not None and lengths
    if not args.no_eval and not evaluate:
        log.info("no task to score (pass --task and --lengths, or --diagnosis): the report has no scores")
    if task is not None:
        resolve(task)
    check_output(args.out, overwrite=args.overwrite, inputs=(args.model,))
    if args.threads:
        torch.set_num_threads(args.threads)
    sparse, ref, tok = load_pair(args, args.model, args.reference)
    check_layers([layer], sparse, "--layer")
    if evaluate:
        check_lengths(sparse, lengths)
    haystack = read_text(args.haystack) if args.haystack else None
    batches = {n: generate(task, tok, n, samples, seed, haystack) for n in lengths} if evaluate else {}

    before = None
    if evaluate and diagnosis is not None and _same_setup(diagnosis, args.model, task, lengths, samples, seed):
        before = {int(n): diagnosis["sparse"][str(n)] for n in lengths}  # the diagnosis scored this very model
        log.info("scores before: from the diagnosis (same model, task, lengths, samples and seed)")
    elif evaluate:
        before = score_lengths(sparse, tok, batches, "before", log.info)
    windows = token_windows(tok, args.data, args.seq_len, args.refit_tokens) if args.method == "refit" else None
    if windows is not None:
        check_lengths(ref, [args.seq_len], "--seq-len")
    record = repair(sparse, layer, args.method, args.keep, ref, windows, steps=args.steps, lr=args.lr,
                    batch_tokens=args.batch_tokens, progress=True)
    after = score_lengths(sparse, tok, batches, "after", log.info) if evaluate else None
    saved = upcycle.save(sparse, args.out, tokenizer=tok, overwrite=args.overwrite, inputs=(args.model,))
    dense = {int(n): diagnosis["dense"][str(n)]["score"] for n in lengths} if (
        evaluate and diagnosis is not None and all(str(n) in diagnosis.get("dense", {}) for n in lengths)) else None
    report = {"model": str(args.model), "out": str(saved), **record, "task": task, "lengths": lengths,
              "samples": samples, "seed": seed}
    if evaluate:
        report["before"] = {str(n): before[n]["score"] for n in lengths}
        report["after"] = {str(n): after[n]["score"] for n in lengths}
        report["after_details"] = {str(n): after[n] for n in lengths}
        if dense is not None:
            report["dense"] = {str(n): dense[n] for n in lengths}
            report["recovered"] = {str(n): ((after[n]["score"] - before[n]["score"]) / (dense[n] - before[n]["score"])
                                            if dense[n] - before[n]["score"] >= diagnosis.get("min_gap", 0.05)
                                            else None) for n in lengths}
    if args.report:
        write_json(Path(args.report), report)
    print(json.dumps(report, indent=1, default=str) if args.json else format_report(report))
    return 0


def _same_setup(d: dict, model: str, task: str, lengths, samples: int, seed: int) -> bool:
    same_model = Path(str(d.get("model", ""))).resolve() == Path(model).resolve()
    return (same_model and d.get("task") == task and d.get("samples") == samples and d.get("seed") == seed
            and all(str(n) in d.get("sparse", {}) for n in lengths))


def format_report(r: dict) -> str:
    lines = [f"repaired layer {r['layer']} of {r['model']} ({r['method']}): keep {r['keep_before']} -> "
             f"{r['keep_after']}; whole-model FFN density {r['ffn_density_before']:.4f} -> "
             f"{r['ffn_density_after']:.4f} ({r['ffn_density_increase']:+.4f})"]
    if "refit" in r:
        f = r["refit"]
        lines.append(f"refit: {f['steps']} steps on {f['tokens']} captured tokens (windows of {f['seq_len']}); "
                     f"held-out FFN output error {f['error_before']:.4f} -> {f['error_after']:.4f} "
                     f"({f['seconds']:.0f} s)")
    if "before" in r:
        lengths = r["lengths"]
        lines += ["", f"{r['task']} ({r['samples']} samples per length, seed {r['seed']})",
                  f"{'':<12}" + "".join(f"{n:>9}" for n in lengths)]
        if "dense" in r:
            lines.append(f"{'dense':<12}" + "".join(f"{r['dense'][str(n)]:>9.3f}" for n in lengths))
        lines.append(f"{'before':<12}" + "".join(f"{r['before'][str(n)]:>9.3f}" for n in lengths))
        lines.append(f"{'after':<12}" + "".join(f"{r['after'][str(n)]:>9.3f}" for n in lengths))
        if "recovered" in r:
            lines.append(f"{'recovered':<12}" + "".join(
                f"{'-' if r['recovered'][str(n)] is None else format(r['recovered'][str(n)], '.0%'):>9}"
                for n in lengths))
    lines.append(f"saved {r['out']}")
    return "\n".join(lines)
