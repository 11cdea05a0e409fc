"""`upcycle eval`: perplexity + per-layer FFN statistics, long-context tasks, post-hoc baselines."""

from __future__ import annotations

import argparse
import json
import logging
import sys

import torch

log = logging.getLogger(__name__)

DESCRIPTION = """\
Evaluate a checkpoint (bank-sparse or plain dense HF) on held-out text and/or synthetic long-context
tasks, with per-layer FFN statistics measured from what the model computes:
  density          fraction of FFN channels whose input to down_proj is nonzero (dense: 1.0)
  bank_util        per bank, exp(entropy of channel-selection counts) / bank_size, mean over banks
                   (1 = all channels used equally often; keep/bank_size = always the same channels)
  dead             fraction of channels never used
  load_max         mean over tokens of the fullest bank's kept fraction (= density when bank-balanced)
  recall           share of the oracle set (top keep of |h| per bank, h computed densely) that is kept
  |h|_kept         sum |h| over used channels / sum |h|, mean over tokens
Perplexity: the text is tokenised whole and cut into windows of --seq-len starting every --stride
tokens; each token is scored once with the context of its window; ppl = exp(mean NLL).
Tasks (RULER's synthetic tasks, generated from --seed as RULER generates them; see README "RULER tasks"):
  niah_single_1/2/3, niah_multikey_1/2/3, niah_multivalue, niah_multiquery, vt, cwe, fwe, passkey
  (aliases: niah = niah_single_1, niah-multikey = niah_multikey_2); essay-haystack tasks need --haystack.
  prompt + answer prefix + the answer budget fit each length; greedy decoding from prompt + answer prefix;
  score = RULER's string_match_all (fraction of the references found, case-insensitive) in [0, 1],
  ruler = the same in percent as RULER reports it, exact = share of samples with every reference found."""

EPILOG = """\
examples:
  upcycle eval --model out/sparse --data heldout.txt
  upcycle eval --model out/sparse --data heldout.txt --reference Qwen2.5-0.5B --json
  upcycle eval --model Qwen2.5-0.5B --data heldout.txt --baseline posthoc-magnitude --reference Qwen2.5-0.5B
  upcycle eval --model Qwen2.5-0.5B --data heldout.txt --baseline posthoc-predictor --calib-data train.txt
  upcycle eval --model out/sparse --task passkey,niah_single_1,cwe,vt --lengths 1024,2048,4096 --samples 10 --json
  upcycle eval --model out/sparse --task all --haystack essays.txt --lengths 4096"""


def add_parser(subparsers) -> None:
    from upcycle.eval import BASELINES
    from upcycle.eval.tasks import ALIASES, TASKS
    from upcycle.recipes import registry

    calibrated = [n for r in registry.load_all() for n in r.baselines if n in r.baselines_need_calibration]

    p = subparsers.add_parser(
        "eval", help="evaluate a checkpoint: perplexity, FFN statistics, long-context tasks, baselines",
        description=DESCRIPTION,
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, metavar="DIR", help="checkpoint directory (upcycle or dense HF)")
    p.add_argument("--data", nargs="+", metavar="PATH", help="held-out text file(s) for perplexity")
    p.add_argument("--seq-len", type=int, default=512, help="window length in tokens (%(default)s)")
    p.add_argument("--stride", type=int, default=None, help="window start spacing (default: seq-len)")
    p.add_argument("--max-windows", type=int, default=None, metavar="N", help="score at most N windows")
    p.add_argument("--batch-size", type=int, default=1, help="windows per forward (%(default)s)")
    p.add_argument("--reference", metavar="DIR", help="dense reference checkpoint: report KL(reference || model)")
    p.add_argument("--baseline", metavar="NAME", help="apply a training-free baseline to the model first (a sparse "
                   f"checkpoint is evaluated as it is without one): {', '.join(BASELINES)}")
    p.add_argument("--keep", type=int, default=16,
                   help="baseline on a dense model: channels kept per bank (%(default)s)")
    p.add_argument("--bank-size", type=int, default=64, help="baseline on a dense model: bank size (%(default)s)")
    p.add_argument("--calib-data", nargs="+", metavar="PATH", help="calibration text of the calibrated baselines "
                   f"({', '.join(calibrated)}); disjoint from --data")
    p.add_argument("--calib-tokens", type=int, default=16384, help="tokens of --calib-data to use (%(default)s)")
    p.add_argument("--calib-steps", type=int, default=None, metavar="N", help="posthoc-predictor: fit steps per "
                   "layer (default: from the layer size, as `upcycle convert --calib-steps`)")
    p.add_argument("--task", metavar="LIST", help=f"comma-separated tasks or 'all' (without --haystack: those that "
                   f"need none): {', '.join(TASKS)}; aliases {', '.join(ALIASES)}")
    p.add_argument("--lengths", default="1024,2048,4096", metavar="LIST", help="task lengths in tokens (%(default)s)")
    p.add_argument("--samples", type=int, default=5, help="samples per task and length (%(default)s)")
    p.add_argument("--seed", type=int, default=42, help="task generation seed (%(default)s, RULER's)")
    p.add_argument("--haystack", nargs="+", metavar="PATH", help="essay text file(s) for the essay-haystack tasks "
                   "(RULER uses Paul Graham's essays)")
    add_rope_arguments(p)
    p.add_argument("--tokenizer", metavar="PATH", help="tokenizer to use (default: the checkpoint's)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype to load the weights in (%(default)s: the checkpoint's own)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of tables")
    p.set_defaults(func=run)


def add_rope_arguments(p) -> None:
    p.add_argument("--rope-scaling", metavar="JSON", type=_json_dict, default=None,
                   help='RoPE scaling for lengths beyond the model\'s positions, e.g. \'{"rope_type": "yarn", '
                   '"factor": 2.0, "original_max_position_embeddings": 8192}\'')
    p.add_argument("--max-position-embeddings", type=int, default=None, metavar="N",
                   help="override max_position_embeddings (with --rope-scaling)")


def _json_dict(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def _ints(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{what} must be comma-separated integers, got {text!r}.") from None
    if not values or min(values) < 1:
        raise ValueError(f"{what} must be positive integers, got {text!r}.")
    return values


def _tasks(text: str, haystack: bool = False) -> list[str]:
    from upcycle.eval.tasks import ESSAY_TASKS, NAMES, TASKS

    if text.strip() == "all":
        names = [t for t in TASKS if haystack or t not in ESSAY_TASKS]
        if not haystack:
            log.info("--task all without --haystack: leaving out the essay-haystack tasks %s", ", ".join(ESSAY_TASKS))
        return names
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in names if t not in NAMES]
    if bad or not names:
        raise ValueError(f"unknown task {', '.join(bad) or repr(text)}: choose from {', '.join(NAMES)} or 'all'.")
    need = [t for t in names if t in ESSAY_TASKS]
    if need and not haystack:
        raise ValueError(f"task(s) {', '.join(need)} use RULER's essay haystack: pass --haystack FILE (RULER uses Paul "
                         "Graham's essays) or choose tasks with a noise or needle haystack.")
    return names


def run(args: argparse.Namespace) -> int:
    from upcycle.eval import evaluate

    if not args.data and not args.task:
        raise ValueError("nothing to evaluate: pass --data PATH (perplexity) and/or --task NAME (long-context).")
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    result = evaluate(
        args.model,
        data=args.data,
        seq_len=args.seq_len,
        stride=args.stride,
        max_windows=args.max_windows,
        batch_size=args.batch_size,
        reference=args.reference,
        baseline=args.baseline,
        keep=args.keep,
        bank_size=args.bank_size,
        calib_data=args.calib_data,
        calib_tokens=args.calib_tokens,
        calib_steps=args.calib_steps,
        tasks=_tasks(args.task, bool(args.haystack)) if args.task else None,
        lengths=_ints(args.lengths, "--lengths"),
        samples=args.samples,
        seed=args.seed,
        haystack=args.haystack,
        tokenizer=args.tokenizer,
        dtype=dtype,
        device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
        rope_scaling=args.rope_scaling,
        max_position_embeddings=args.max_position_embeddings,
        progress=True,  # on stderr, as convert's and train's bars: stdout stays the table or the JSON
    )
    if args.json:
        json.dump(result, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        from upcycle.eval.report import format_report

        print(format_report(result))
    return 0
