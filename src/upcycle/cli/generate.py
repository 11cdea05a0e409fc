"""`upcycle generate --model DIR --prompt TEXT`: stream a continuation to stdout with upcycle's decode path."""

from __future__ import annotations

import argparse
import sys


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if not value > 0 or value != value:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def _non_negative(text: str) -> float:
    value = float(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate", help="generate text from a checkpoint (dense or converted), streamed as it decodes",
        description="Greedy (default) or sampled generation on CPU through upcycle.generate: a static KV cache and "
        "a low-overhead decode loop over the model's own layers (sparse FFNs run their decode kernels). The text "
        "goes to stdout as it is generated; timings go to stderr.")
    p.add_argument("--model", required=True, help="checkpoint directory (dense or converted) or .gguf file")
    p.add_argument("--prompt", required=True, help="the prompt text ('-' reads it from stdin)")
    p.add_argument("--max-new-tokens", type=_positive(int), default=128, help="at most this many tokens (%(default)s)")
    p.add_argument("--temperature", type=_non_negative, default=0.0, help="0 = greedy (%(default)s)")
    p.add_argument("--top-k", type=_positive(int), default=None, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=_positive(float), default=None, help="nucleus sampling mass in (0, 1]")
    p.add_argument("--stop", action="append", default=[], metavar="STR",
                   help="stop once the generated text contains STR (repeatable)")
    p.add_argument("--seed", type=int, default=None, help="seed of the sampler (reproducible samples)")
    p.add_argument("--chat", action="store_true",
                   help="wrap the prompt in the tokenizer's chat template as a user turn")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="weight dtype (auto: as saved)")
    p.add_argument("--quantize", choices=("none", "int8", "int4"), default="none",
                   help="quantise the linear weights at load (upcycle.quantize): int8 with per-channel scales, int4 "
                   "with a scale and minimum per group of 32 (as Q4_1); none: as loaded (%(default)s)")
    p.add_argument("--threads", type=_positive(int), default=None, help="CPU threads (default: torch's)")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (slow first call)")
    p.add_argument("--tokenizer", default=None, help="tokenizer path (default: the checkpoint's)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import time

    import torch

    import upcycle
    from upcycle.data.tokenizer import load_tokenizer
    from upcycle.generation import TextStream, generate

    if args.top_p is not None and args.top_p > 1:
        raise ValueError(f"--top-p must lie in (0, 1], got {args.top_p}")
    if args.threads:
        torch.set_num_threads(args.threads)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    tokenizer = load_tokenizer(args.model, args.tokenizer)
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    model = upcycle.load(args.model, dtype=dtype).eval()
    if args.quantize != "none":
        from upcycle.quantization import quantize

        quantize(model, args.quantize)
    if args.chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"the tokenizer of {args.model} has no chat template: drop --chat")
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
    if ids.shape[1] == 0:
        raise ValueError("the prompt is empty after tokenisation: pass some text")
    out = sys.stdout
    stream = TextStream(tokenizer, lambda s: (out.write(s), out.flush()))
    steps: list[float] = []

    def on_token(tok: torch.Tensor) -> None:
        steps.append(time.perf_counter())
        stream(tok)

    t0 = time.perf_counter()
    result = generate(model, ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                      top_p=args.top_p, stop_strings=args.stop or None, tokenizer=tokenizer, stream=on_token,
                      compile=args.compile, seed=args.seed)
    stream.flush()
    out.write("\n")
    out.flush()
    n = result.shape[1] - ids.shape[1]
    prefill = steps[0] - t0 if steps else 0.0
    decode = (n - 1) / (steps[-1] - steps[0]) if n > 1 and steps[-1] > steps[0] else float("nan")
    print(f"[{ids.shape[1]} prompt tokens, {n} generated; prefill + first token {prefill:.2f} s, "
          f"decode {decode:.1f} tokens/s, {torch.get_num_threads()} threads]", file=sys.stderr)
    return 0
