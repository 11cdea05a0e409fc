"""RULER-style synthetic long-context tasks, generated locally from a seed, at any length in tokens.

- `niah`: one needle "One of the special magic numbers for KEY is: VALUE." in a haystack; answer VALUE.
- `niah-multikey`: four needles with different keys; one key is asked (the others are distractors).
- `cwe` (common-words extraction): a numbered list of words where 10 words appear many times and
  the rest a few times; answer the 10 common words.
- `vt` (variable tracking): a chain VAR A = 12345 ... VAR E = VAR D hidden in the haystack; answer
  every variable that holds the value.

A sample's prompt fills `length - max_new_tokens` tokens of the given tokenizer (as close as the
filler's granularity allows, never over), so prompt + answer fits `length`. The haystack is RULER's
noise sentences by default, or words of the texts passed as `haystack`. Scoring (RULER's
string-match-all): `score` = fraction of the expected items found in the greedy continuation
(whole-word, case-insensitive), `exact_match` = 1 if all are found.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
WORDS = (
    "apple river stone cloud forest garden window candle silver orange tiger rabbit violin mirror "
    "planet rocket pencil island castle dragon engine harbor jacket ladder meadow needle pepper "
    "quartz saddle tunnel velvet wagon yellow zebra anchor basket cactus dolphin feather glacier "
    "hammer igloo jungle kettle lantern marble nectar oyster parrot quiver raven sunset thunder "
    "umbrella valley walnut barrel copper desert ember falcon ginger hollow ivory jasmine kernel "
    "lemon mango nutmeg olive pillow quilt ribbon saffron timber utensil vessel willow bamboo "
    "canyon dagger eagle fabric goblet helmet iris juniper koala lotus magnet nickel orbit "
    "pebble puzzle rhythm spider tomato unicorn vapor whistle blossom coral daisy fossil granite "
    "horizon insect jewel knight lizard meteor noodle oxygen pirate quarry rainbow sapphire "
    "tortoise uplift volcano wizard bridge camera doctor elbow fiddle guitar hazel indigo "
    "jigsaw kayak lobster mitten nebula onion panda quill robin shadow tulip vortex waffle"
).split()
TEMPLATES = {
    "niah": (
        "Some special magic numbers are hidden within the following text. Make sure to memorize it. "
        "I will quiz you about the numbers afterwards.\n{context}\nWhat is the special magic number for "
        "{key} mentioned in the provided text? The special magic number for {key} mentioned in the "
        "provided text is"
    ),
    "cwe": (
        "Below is a numbered list of words. In these words, some appear more often than others. Memorize "
        "the ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the "
        "above list? Answer: The top 10 words that appear most often in the list are:"
    ),
    "vt": (
        "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
        "Question: Find all variables that are assigned the value {value} in the text above. Answer: "
        "According to the chain(s) of variable assignment in the text above, {n} variables are assigned "
        "the value {value}, they are:"
    ),
}
MAX_NEW_TOKENS = {"niah": 32, "niah-multikey": 32, "cwe": 120, "vt": 48}
TASKS = tuple(MAX_NEW_TOKENS)


@dataclass
class Sample:
    task: str
    prompt: str
    answers: list[str]
    length: int  # the target length: prompt tokens + max_new_tokens <= length
    n_tokens: int  # prompt tokens (tokenizer defaults, e.g. with BOS)
    max_new_tokens: int
    meta: dict = field(default_factory=dict)


def _count(tokenizer, text: str) -> int:
    return len(tokenizer(text, verbose=False)["input_ids"])


def _fit(build: Callable[[int], str], tokenizer, budget: int, what: str) -> tuple[str, int]:
    """The longest build(n) (n filler units) whose token count is <= budget, and that count."""
    n0 = _count(tokenizer, build(0))
    if n0 > budget:
        raise ValueError(f"{what}: even without filler the prompt has {n0} tokens > {budget}: use a longer length.")
    lo, hi = 0, 16
    while _count(tokenizer, build(hi)) <= budget:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if _count(tokenizer, build(mid)) <= budget else (lo, mid)
    text = build(lo)
    return text, _count(tokenizer, text)


def _filler(rng: random.Random, haystack: Sequence[str] | None) -> Callable[[int], list[str]]:
    """n -> n filler units: RULER noise sentences, or consecutive words of `haystack` from a random start."""
    if not haystack:
        sentences = [s.strip() + "." for s in NOISE.split(".") if s.strip()]
        return lambda n: [sentences[i % len(sentences)] for i in range(n)]
    words = " ".join(haystack).split()
    if not words:
        raise ValueError("the haystack texts contain no words.")
    start = rng.randrange(len(words))
    return lambda n: [words[(start + i) % len(words)] for i in range(n)]


def _insert(units: list[str], items: list[str], depths: list[float]) -> str:
    """Insert each item at its relative depth in [0, 1] among the filler units; join with spaces."""
    placed = sorted(zip((round(d * len(units)) for d in depths), range(len(items)), items, strict=True))
    out = list(units)
    for k, (pos, _, item) in enumerate(placed):
        out.insert(pos + k, item)
    return " ".join(out)


def _number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _words(rng: random.Random, n: int) -> list[str]:
    """n distinct words: the built-in list first, then pronounceable pseudo-words."""
    pool = list(WORDS)
    rng.shuffle(pool)
    out, seen = pool[:n], set(pool[:n])
    syll = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    while len(out) < n:
        w = "".join(rng.choice(syll) for _ in range(rng.randint(2, 3)))
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def _niah(rng, tokenizer, budget, haystack, n_keys):
    words = _words(rng, 2 * n_keys)
    keys = [f"{words[2 * i]}-{words[2 * i + 1]}" for i in range(n_keys)]
    values = [_number(rng) for _ in keys]
    needles = [f"One of the special magic numbers for {k} is: {v}." for k, v in zip(keys, values, strict=True)]
    depths = [rng.random() for _ in keys]
    ask = rng.randrange(n_keys)
    fill = _filler(rng, haystack)

    def build(n):
        return TEMPLATES["niah"].format(context=_insert(fill(n), needles, depths), key=keys[ask])

    return build, [values[ask]], {"depth": depths[ask], "n_needles": n_keys}


def _cwe(rng, tokenizer, budget, haystack, num_cw=10):
    """n = number of uncommon words; frequencies shrink (30/3 as in RULER, down to 2/1) to fit short lengths."""
    seed = rng.randrange(1 << 30)

    def make(freq_cw, freq_ucw):
        def build(n):
            words = _words(random.Random(seed), num_cw + n)  # prefix-stable: the common words never change
            items = words[:num_cw] * freq_cw + words[num_cw:] * freq_ucw
            random.Random(seed + n).shuffle(items)
            return TEMPLATES["cwe"].format(context="\n".join(f"{i + 1}. {w}" for i, w in enumerate(items)))

        return build

    for freq_cw, freq_ucw in ((30, 3), (20, 3), (10, 2), (6, 2), (4, 1), (2, 1)):
        build = make(freq_cw, freq_ucw)
        if _count(tokenizer, build(0)) <= budget * 0.6:
            break
    return build, _words(random.Random(seed), num_cw), {"freq_cw": freq_cw, "freq_ucw": freq_ucw}


def _vt(rng, tokenizer, budget, haystack, hops=4):
    names = []
    while len(names) < hops + 1:
        name = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if name not in names:
            names.append(name)
    value = str(rng.randint(10000, 99999))
    chain = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i + 1]} = VAR {names[i]}." for i in range(hops)]
    depths = sorted(rng.random() for _ in chain)  # the chain keeps its order
    fill = _filler(rng, haystack)

    def build(n):
        return TEMPLATES["vt"].format(context=_insert(fill(n), chain, depths), value=value, n=len(names))

    return build, names, {"hops": hops}


def generate(
    task: str,
    tokenizer,
    length: int,
    n: int = 1,
    seed: int = 0,
    haystack: Sequence[str] | None = None,
    max_new_tokens: int | None = None,
) -> list[Sample]:
    """`n` samples of `task` at `length` tokens of `tokenizer`; the same seed gives the same samples.

    `max_new_tokens` overrides the task's answer budget (MAX_NEW_TOKENS; too few tokens cut answers).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: choose one of {', '.join(TASKS)}.")
    max_new = max_new_tokens or MAX_NEW_TOKENS[task]
    budget = length - max_new
    samples = []
    for i in range(n):
        rng = random.Random(f"{seed}-{task}-{length}-{i}")
        if task == "cwe":
            build, answers, meta = _cwe(rng, tokenizer, budget, haystack)
        elif task == "vt":
            build, answers, meta = _vt(rng, tokenizer, budget, haystack)
        else:
            build, answers, meta = _niah(rng, tokenizer, budget, haystack, 1 if task == "niah" else 4)
        prompt, n_tokens = _fit(build, tokenizer, budget, f"task {task} at length {length}")
        samples.append(Sample(task, prompt, answers, length, n_tokens, max_new, meta))
    return samples


def score(output: str, answers: Sequence[str]) -> float:
    """Fraction of `answers` found in `output` as whole words (case-insensitive)."""
    found = [re.search(rf"(?<!\w){re.escape(a)}(?!\w)", output, re.IGNORECASE) is not None for a in answers]
    return sum(found) / len(found)


def evaluate(generate_fn: Callable[[Sample], str], samples: Sequence[Sample]) -> dict:
    """{"score", "exact_match", "n"}: means over `samples` of `generate_fn(sample)`'s scores."""
    scores = [score(generate_fn(s), s.answers) for s in samples]
    return {
        "score": sum(scores) / len(scores),
        "exact_match": sum(s == 1.0 for s in scores) / len(scores),
        "n": len(scores),
    }


def hf_generate_fn(model: nn.Module, tokenizer) -> Callable[[Sample], str]:
    """Greedy continuation of a sample's prompt by an HF causal LM (batch 1), decoded to text."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    @torch.no_grad()
    def gen(sample: Sample) -> str:
        device = next(model.parameters()).device
        enc = tokenizer(sample.prompt, return_tensors="pt", verbose=False).to(device)
        out = model.generate(**enc, max_new_tokens=sample.max_new_tokens, do_sample=False, pad_token_id=pad)
        return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)

    return gen


def run(
    model: nn.Module,
    tokenizer,
    tasks: Sequence[str],
    lengths: Sequence[int],
    n: int = 5,
    seed: int = 0,
    haystack: Sequence[str] | None = None,
    stats: bool = True,
    max_new_tokens: int | None = None,
) -> dict:
    """{task: {length: {"score", "exact_match", "n", "prompt_tokens", and with stats: "ffn_density",
    "recall", "mass_kept", "tokens", "layers"}}} over `n` samples per (task, length), greedy decoding.

    The statistics cover every token the model ran on for that (task, length): prompts and generated tokens.
    """
    from upcycle.eval.stats import stats_for

    gen = hf_generate_fn(model, tokenizer)
    out: dict = {}
    for task in tasks:
        out[task] = {}
        for length in lengths:
            samples = generate(task, tokenizer, length, n, seed, haystack, max_new_tokens)
            if stats:
                with stats_for(model) as st:
                    res = evaluate(gen, samples)
                summary = st.summary()
                res.update({k: summary.get(k) for k in ("ffn_density", "recall", "mass_kept", "tokens", "layers")})
            else:
                res = evaluate(gen, samples)
            res["prompt_tokens"] = sum(s.n_tokens for s in samples) / len(samples)
            out[task][length] = res
    return out
