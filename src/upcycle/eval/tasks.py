"""RULER's synthetic long-context tasks at any length in tokens, scored as RULER scores them.

The generators and scorers are `upcycle.eval.ruler` (a RULER-faithful re-implementation; see its
docstring and the README for where it differs from RULER and from lm-eval's `ruler` port). This module
is what `upcycle eval --task` and `upcycle diagnose` use: task names and aliases, the haystack and the
special-token reserve, greedy decoding from `prompt + answer_prefix`, per-length results.

Tasks (`TASKS`): niah_single_1/2/3, niah_multikey_1/2/3, niah_multivalue, niah_multiquery (RULER's
needle-in-a-haystack variants), vt (variable tracking: 1 chain, 4 hops), cwe (common words extraction:
10 common words 30x and uncommon ones 3x, 6x / 1x below 4K tokens, with the one-shot example), fwe
(frequent words extraction) and passkey (not RULER: a 5-digit key in noise sentences, which small models
solve). The old names stay as aliases (`ALIASES`): niah -> niah_single_1, niah-multikey -> niah_multikey_2
(distractor needles, no essay needed), cwe, vt. Tasks with RULER's essay haystack (niah_single_2/3,
niah_multikey_1, niah_multivalue, niah_multiquery) need haystack text (RULER uses Paul Graham's essays).

Scoring is RULER's string_match_all (the fraction of the references found in the post-processed
prediction, case-insensitive substring; `string_match_part` for QA-like tasks): `score` is the mean over
samples in [0, 1], `ruler_score` the same in percent rounded to 2 decimals (what RULER reports),
`exact_match` the share of samples with every reference found.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from torch import nn

from upcycle.eval import ruler
from upcycle.eval.ruler import RulerSample, postprocess_pred, sample_score

TASKS: tuple[str, ...] = tuple(ruler.TASKS)
ALIASES: dict[str, str] = {"niah": "niah_single_1", "niah-multikey": "niah_multikey_2"}
ESSAY_TASKS: tuple[str, ...] = tuple(
    n for n, s in ruler.TASKS.items() if getattr(s.args, "type_haystack", None) == "essay"
)
NAMES: tuple[str, ...] = TASKS + tuple(ALIASES)
DEFAULT_SEED = 42  # RULER's --random_seed

Sample = RulerSample


def resolve(task: str) -> str:
    """The RULER name of `task` (an alias maps to its RULER task); ValueError listing the names."""
    name = ALIASES.get(task, task)
    if name not in ruler.TASKS:
        raise ValueError(f"unknown task {task!r}: choose one of {', '.join(TASKS)} (aliases: "
                         f"{', '.join(f'{a}={b}' for a, b in ALIASES.items())}).")
    return name


def needs_haystack(task: str) -> bool:
    return resolve(task) in ESSAY_TASKS


def special_tokens(tokenizer) -> int:
    """Tokens the tokenizer adds around a text (BOS/EOS): RULER does not count them, generation feeds them."""
    try:
        return len(tokenizer("", verbose=False)["input_ids"])
    except TypeError:  # a plain str -> int counter
        return 0


def _haystack_text(haystack: str | Sequence[str] | None) -> str | None:
    if haystack is None or isinstance(haystack, str):
        return haystack or None
    return "\n\n".join(haystack) or None


def generate(
    task: str,
    tokenizer,
    length: int,
    n: int = 1,
    seed: int = DEFAULT_SEED,
    haystack: str | Sequence[str] | None = None,
    max_new_tokens: int | None = None,
    start_index: int = 0,
) -> list[RulerSample]:
    """`n` samples of `task` at `length` tokens: prompt + answer prefix + the answer budget + the
    tokenizer's special tokens fit `length`. Sample i is the same whatever `n` is (for a given tokenizer).

    `haystack`: essay text (a string or documents) for the essay tasks. `max_new_tokens` overrides the
    task's answer budget (RULER's tokens_to_generate: too few tokens cut answers).
    """
    name = resolve(task)
    spec = ruler.get_task(name)
    if max_new_tokens:
        spec = dataclasses.replace(spec, tokens_to_generate=max_new_tokens)
    text = _haystack_text(haystack)
    if name in ESSAY_TASKS and text is None:
        raise ValueError(f"task {name} uses RULER's essay haystack: pass haystack text (--haystack FILE; RULER "
                         "uses Paul Graham's essays), or use a task with a noise or needle haystack "
                         f"({', '.join(t for t in TASKS if t not in ESSAY_TASKS)}).")
    if length < 1 or n < 1:
        raise ValueError(f"length and samples must be >= 1, got length={length}, samples={n}.")
    try:
        return ruler.generate_samples(spec, tokenizer, length, n, seed=seed, start_index=start_index,
                                      haystack_text=text, reserve_tokens=special_tokens(tokenizer))
    except ValueError as e:
        if "fit in" not in str(e):
            raise
        raise ValueError(f"{e}: use a longer length.") from None


def score(output: str, answers: Sequence[str], metric: str = "string_match_all") -> float:
    """RULER's per-sample score of a raw continuation in [0, 1] (post-processed first, substring match)."""
    return sample_score(postprocess_pred(output), list(answers), metric)


def evaluate(generate_fn: Callable[[RulerSample], str], samples: Sequence[RulerSample],
             on_result: Callable[[RulerSample, str, float], None] | None = None) -> dict:
    """{"score", "ruler_score", "exact_match", "nulls", "n", "sample_scores"} over `samples`, which share a
    task and length: `generate_fn(sample)` is the continuation after `sample.input_text`."""
    if not samples:
        raise ValueError("no samples to evaluate")
    scores, preds = [], []
    for s in samples:
        raw = generate_fn(s)
        pred = postprocess_pred(raw)
        scores.append(sample_score(pred, list(s.outputs), s.metric))
        preds.append(pred)
        if on_result is not None:
            on_result(s, pred, scores[-1])
    metric = {"string_match_all": ruler.string_match_all, "string_match_part": ruler.string_match_part}
    return {
        "score": sum(scores) / len(scores),
        "ruler_score": metric[samples[0].metric](preds, [list(s.outputs) for s in samples]),
        "exact_match": sum(s == 1.0 for s in scores) / len(scores),
        "nulls": sum(not p for p in preds),
        "n": len(scores),
        "sample_scores": scores,
    }


def hf_generate_fn(model: nn.Module, tokenizer) -> Callable[[RulerSample], str]:
    """Greedy continuation (batch 1, `sample.max_new_tokens` new tokens) of `prompt + answer_prefix`, with
    the tokenizer's special tokens, as RULER's HF runner; only the new tokens are decoded."""
    return ruler.make_hf_generate_fn(model, tokenizer)


def rope_scaled(config) -> bool:
    """Whether an HF config extends its positions by RoPE scaling (linear, dynamic, yarn, llama3, ...)."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if isinstance(params, dict) and any(isinstance(v, dict) for v in params.values()):  # per layer type
        params = next(v for v in params.values() if isinstance(v, dict))
    kind = params.get("rope_type", params.get("type", "default")) if isinstance(params, dict) else "default"
    return kind not in (None, "default")


def check_lengths(model: nn.Module, lengths: Sequence[int], what: str = "--lengths") -> None:
    """ValueError when a length exceeds the model's positions and its RoPE is not scaled."""
    config = getattr(model, "config", None)
    limit = getattr(config, "max_position_embeddings", None)
    over = [n for n in lengths if limit and n > limit]
    if over and not rope_scaled(config):
        raise ValueError(
            f"{what} {', '.join(map(str, over))} exceed the model's max_position_embeddings={limit} and its RoPE "
            f"has no scaling: use lengths <= {limit}, or extend the positions with RoPE scaling (e.g. --rope-scaling "
            f"'{{\"rope_type\": \"yarn\", \"factor\": {max(over) / limit:g}, \"original_max_position_embeddings\": "
            f"{limit}}}')."
        )


def run(
    model: nn.Module,
    tokenizer,
    tasks: Sequence[str],
    lengths: Sequence[int],
    n: int = 5,
    seed: int = DEFAULT_SEED,
    haystack: str | Sequence[str] | None = None,
    stats: bool = True,
    max_new_tokens: int | None = None,
    on_result: Callable[[RulerSample, str, float], None] | None = None,
    progress: bool = False,
) -> dict:
    """{task: {length: {"score", "ruler_score", "exact_match", "nulls", "n", "sample_scores", "prompt_tokens",
    and with stats: "ffn_density", "recall", "mass_kept", "tokens", "layers"}}} over `n` samples per
    (task, length), greedy decoding. Tasks are reported under the names given (aliases included).

    The statistics cover every token the model ran on for that (task, length): prompts and generated tokens.
    `progress`: a bar over the samples (greedy decoding at long lengths is the slow part).
    """
    from tqdm.auto import tqdm

    from upcycle.eval.stats import stats_for

    check_lengths(model, lengths)
    gen = hf_generate_fn(model, tokenizer)
    bar = tqdm(total=len(tasks) * len(lengths) * n, desc="tasks", unit="sample", disable=not progress)

    def done(sample: RulerSample, pred: str, value: float) -> None:
        bar.update(1)
        if on_result is not None:
            on_result(sample, pred, value)

    out: dict = {}
    for task in tasks:
        resolve(task)
        out[task] = {}
        for length in lengths:
            bar.set_postfix(task=task, length=length)
            samples = generate(task, tokenizer, length, n, seed, haystack, max_new_tokens)
            if stats:
                with stats_for(model) as st:
                    res = evaluate(gen, samples, done)
                summary = st.summary()
                res.update({k: summary.get(k) for k in ("ffn_density", "recall", "mass_kept", "tokens", "layers")})
            else:
                res = evaluate(gen, samples, done)
            res["prompt_tokens"] = sum(s.prompt_tokens + special_tokens(tokenizer) for s in samples) / len(samples)
            out[task][length] = res
    bar.close()
    return out
