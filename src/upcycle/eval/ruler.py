"""RULER-faithful synthetic long-context tasks: generators, scorers and a greedy HF runner.

A re-implementation (no code copied) of NVIDIA RULER's synthetic tasks (github.com/NVIDIA/RULER, read at
commit c3f5e3b): ``scripts/data/synthetic/{niah,variable_tracking,common_words_extraction,
freq_words_extraction}.py``, the task table of ``scripts/synthetic.yaml``, the templates, answer prefixes
and ``tokens_to_generate`` of ``scripts/data/synthetic/constants.py`` and the metrics and prediction
post-processing of ``scripts/eval/{evaluate.py,synthetic/constants.py}``; plus a classic ``passkey`` task
(the Mohtashami & Jaggi 2023 prompt) that small models can solve.

Every sample is a pure function of ``(task, length, seed, index)`` and a tokenizer, reproducible byte for
byte and independent of how many samples are generated; nothing is downloaded. The prompt format and the
algorithms (haystack construction, needle placement, size search, answer extraction, metric) follow
RULER; where behaviour differs, and why, is listed in the README ("RULER tasks") and in comments below.

This module imports nothing from upcycle (``upcycle.eval.tasks`` is the layer the CLI uses). Dependencies:
the standard library and ``wonderwords`` (RULER's word lists, pinned in pyproject because they change the
samples); the HF runner also needs ``torch`` and ``transformers``.
"""

from __future__ import annotations

import hashlib
import heapq
import importlib.metadata
import importlib.resources
import math
import random
import re
import string
import uuid
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cache
from typing import Any, Literal, Protocol

__all__ = [
    "CWEArgs",
    "DEPTHS",
    "EvalReport",
    "FWEArgs",
    "NOISE_HAYSTACK",
    "NiahArgs",
    "PasskeyArgs",
    "RulerSample",
    "SampleResult",
    "TASKS",
    "TaskScore",
    "TaskSpec",
    "VTArgs",
    "evaluate",
    "generate_sample",
    "generate_samples",
    "get_task",
    "make_hf_generate_fn",
    "postprocess_pred",
    "riemann_zeta",
    "sample_score",
    "split_sentences",
    "string_match_all",
    "string_match_part",
]

# --------------------------------------------------------------------------------------------------
# Constants (prompt text must match RULER exactly, so these strings are RULER's)
# --------------------------------------------------------------------------------------------------

#: RULER's "noise" haystack sentence (also the passkey filler of Mohtashami & Jaggi).
NOISE_HAYSTACK = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

#: RULER's needle sentence; the "needle" haystack is made of distractor copies of it.
NIAH_NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."

#: ``np.round(np.linspace(0, 100, 40)).astype(int)`` as RULER uses for essay insertion depths
#: (computed in pure Python; no x.5 ties occur, so Python's rounding agrees with numpy's).
DEPTHS: tuple[int, ...] = tuple(int(round(i * 100 / 39)) for i in range(40))

NIAH_TEMPLATE = (
    "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {type_needle_v} afterwards.\n{context}\n"
    "What are all the special magic {type_needle_v} for {query} mentioned in the provided text?"
)
NIAH_ANSWER_PREFIX = " The special magic {type_needle_v} for {query} mentioned in the provided text are"

VT_TEMPLATE = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
    "Question: Find all variables that are assigned the value {query} in the text above."
)
VT_ANSWER_PREFIX = (
    " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are "
    "assigned the value {query}, they are: "
)

CWE_TEMPLATE = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.\n{context}\n"
    "Question: What are the 10 most common words in the above list?"
)
CWE_ANSWER_PREFIX = " Answer: The top 10 words that appear most often in the list are:"

FWE_TEMPLATE = (
    "Read the following coded text and track the frequency of each coded word. Find the three most "
    "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore "
    "the dots '....'. What are the three most frequently appeared words in the above coded text?"
)
FWE_ANSWER_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"

# Passkey (not part of RULER): the Mohtashami & Jaggi (2023) / LongLoRA prompt, split RULER-style into
# a prompt and an answer prefix so that it flows through the same generation and scoring path.
PASSKEY_TEMPLATE = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there.\n{context}\nWhat is the pass key?"
)
PASSKEY_ANSWER_PREFIX = " The pass key is"
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."

#: RULER's ``Templates['base']``; pass another string containing ``{task_template}`` for chat models.
BASE_MODEL_TEMPLATE = "{task_template}"

NeedleType = Literal["numbers", "words", "uuids"]
HaystackType = Literal["noise", "essay", "needle"]
MetricName = Literal["string_match_all", "string_match_part"]

# --------------------------------------------------------------------------------------------------
# Task specifications
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NiahArgs:
    """Arguments of RULER's ``niah.py`` (defaults are its argparse defaults)."""

    type_haystack: HaystackType = "essay"
    type_needle_k: NeedleType = "words"
    type_needle_v: NeedleType = "numbers"
    num_needle_k: int = 1
    num_needle_v: int = 1
    num_needle_q: int = 1


@dataclass(frozen=True)
class VTArgs:
    """Arguments of RULER's ``variable_tracking.py``; the one-shot example is always on in RULER."""

    type_haystack: Literal["noise", "essay"] = "noise"
    num_chains: int = 1
    num_hops: int = 4
    add_fewshot: bool = True


@dataclass(frozen=True)
class CWEArgs:
    """Arguments of RULER's ``common_words_extraction.py``.

    ``freq_cw``/``freq_ucw`` apply from 4096 tokens up; below that RULER hard-codes 6/1 (and a
    20-word one-shot example with 3/1 instead of a 40-word one with 10/3).
    """

    freq_cw: int = 30
    freq_ucw: int = 3
    num_cw: int = 10
    num_fewshot: int = 1


@dataclass(frozen=True)
class FWEArgs:
    """Arguments of RULER's ``freq_words_extraction.py`` (``vocab_size=-1`` means budget // 50)."""

    alpha: float = 2.0
    coded_wordlen: int = 6
    vocab_size: int = -1


@dataclass(frozen=True)
class PasskeyArgs:
    """Passkey retrieval: a 5-digit key (LongLoRA's variant) in repeated noise sentences."""

    num_digits: int = 5


TaskArgs = NiahArgs | VTArgs | CWEArgs | FWEArgs | PasskeyArgs


@dataclass(frozen=True)
class TaskSpec:
    """One named task: RULER's yaml entry merged with its ``constants.py`` entry."""

    name: str
    args: TaskArgs
    tokens_to_generate: int
    template: str
    answer_prefix: str
    metric: MetricName = "string_match_all"

    @property
    def kind(self) -> str:
        """RULER's generator family (``task:`` in synthetic.yaml), or ``passkey``."""
        return _KIND_BY_ARGS[type(self.args)]

    def with_args(self, **changes: Any) -> TaskSpec:
        """Return a copy with some generator arguments changed, e.g. ``type_haystack="noise"``."""
        return replace(self, args=replace(self.args, **changes))


_KIND_BY_ARGS: dict[type, str] = {
    NiahArgs: "niah",
    VTArgs: "variable_tracking",
    CWEArgs: "common_words_extraction",
    FWEArgs: "freq_words_extraction",
    PasskeyArgs: "passkey",
}


def _niah(name: str, **kwargs: Any) -> TaskSpec:
    return TaskSpec(name, NiahArgs(**kwargs), 128, NIAH_TEMPLATE, NIAH_ANSWER_PREFIX)


#: The tasks of RULER's ``synthetic.yaml`` (minus qa_1/qa_2, which need SQuAD/HotpotQA) plus passkey.
TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        _niah("niah_single_1", type_haystack="noise", type_needle_k="words", type_needle_v="numbers"),
        _niah("niah_single_2", type_haystack="essay", type_needle_k="words", type_needle_v="numbers"),
        _niah("niah_single_3", type_haystack="essay", type_needle_k="words", type_needle_v="uuids"),
        _niah("niah_multikey_1", type_haystack="essay", type_needle_k="words", type_needle_v="numbers", num_needle_k=4),
        _niah("niah_multikey_2", type_haystack="needle", type_needle_k="words", type_needle_v="numbers"),
        _niah("niah_multikey_3", type_haystack="needle", type_needle_k="uuids", type_needle_v="uuids"),
        _niah("niah_multivalue", type_haystack="essay", type_needle_k="words", type_needle_v="numbers", num_needle_v=4),
        _niah("niah_multiquery", type_haystack="essay", type_needle_k="words", type_needle_v="numbers", num_needle_q=4),
        TaskSpec("vt", VTArgs(), 30, VT_TEMPLATE, VT_ANSWER_PREFIX),
        TaskSpec("cwe", CWEArgs(), 120, CWE_TEMPLATE, CWE_ANSWER_PREFIX),
        TaskSpec("fwe", FWEArgs(), 50, FWE_TEMPLATE, FWE_ANSWER_PREFIX),
        TaskSpec("passkey", PasskeyArgs(), 16, PASSKEY_TEMPLATE, PASSKEY_ANSWER_PREFIX),
    )
}

#: Metric per RULER task family, as in RULER's ``scripts/eval/synthetic/constants.py`` (qa is listed for
#: completeness; its generator is not implemented here).
RULER_METRICS: dict[str, MetricName] = {
    "niah": "string_match_all",
    "variable_tracking": "string_match_all",
    "common_words_extraction": "string_match_all",
    "freq_words_extraction": "string_match_all",
    "qa": "string_match_part",
    "passkey": "string_match_all",
}


def get_task(task: str | TaskSpec) -> TaskSpec:
    """Resolve a task name (or pass a :class:`TaskSpec` through), failing with the list of names."""
    if isinstance(task, TaskSpec):
        return task
    try:
        return TASKS[task]
    except KeyError:
        raise KeyError(f"unknown task {task!r}; known: {', '.join(TASKS)}") from None


# --------------------------------------------------------------------------------------------------
# Samples
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RulerSample:
    """One generated example.

    ``prompt`` is RULER's ``input`` and ``answer_prefix`` its ``answer_prefix``: the model is fed
    ``prompt + answer_prefix`` (see :attr:`input_text`), as RULER's ``call_api.py`` does.
    ``prompt_tokens`` counts that whole text without special tokens, the way RULER counts, so
    ``prompt_tokens + max_new_tokens + reserve_tokens <= length`` always holds.
    """

    task: str
    index: int
    seed: int
    length: int
    prompt: str
    answer_prefix: str
    outputs: tuple[str, ...]
    prompt_tokens: int
    max_new_tokens: int
    metric: MetricName
    metadata: Mapping[str, Any] = field(default_factory=dict)

    @property
    def input_text(self) -> str:
        """The exact text to generate from: prompt with the answer prefix appended."""
        return self.prompt + self.answer_prefix

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; ``input``/``outputs``/``answer_prefix`` use RULER's jsonl field names."""
        return {
            "task": self.task,
            "index": self.index,
            "seed": self.seed,
            "length": self.length,
            "input": self.prompt,
            "answer_prefix": self.answer_prefix,
            "outputs": list(self.outputs),
            "prompt_tokens": self.prompt_tokens,
            "max_new_tokens": self.max_new_tokens,
            "metric": self.metric,
            "metadata": dict(self.metadata),
        }


class _Tokenizer(Protocol):
    def tokenize(self, text: str) -> list[str]: ...


TokenizerLike = _Tokenizer | Callable[[str], int]


def _token_counter(tokenizer: TokenizerLike) -> Callable[[str], int]:
    """Count tokens like RULER's ``HFTokenizer.text_to_tokens`` (``tokenize``: no BOS/EOS).

    ``tokenize`` is used rather than ``__call__`` so that texts longer than ``model_max_length`` do
    not trigger HF's truncation warning during the size search. A plain ``str -> int`` callable is
    accepted for other tokenizers.
    """
    tokenize = getattr(tokenizer, "tokenize", None)
    if callable(tokenize):
        return lambda text: len(tokenize(text))
    if callable(tokenizer):
        return lambda text: int(tokenizer(text))  # type: ignore[arg-type]
    raise TypeError("tokenizer must have .tokenize(text) or be a callable text -> token count")


def _derive_rng(*parts: object) -> random.Random:
    """A ``random.Random`` seeded from a stable hash of ``parts`` (not Python's salted ``hash``)."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


# --------------------------------------------------------------------------------------------------
# Word lists
# --------------------------------------------------------------------------------------------------


@cache
def _wonderwords_list(filename: str) -> tuple[str, ...]:
    """Read one of wonderwords' bundled lists the way RULER does (``readlines`` + ``rstrip``)."""
    try:
        assets = importlib.resources.files("wonderwords.assets")
    except ModuleNotFoundError as err:  # pragma: no cover - depends on the environment
        raise ImportError("RULER's word lists come from the `wonderwords` package: pip install wonderwords") from err
    text = assets.joinpath(filename).read_text(encoding="utf-8")
    return tuple(line.rstrip() for line in text.splitlines(keepends=True))


def wonderwords_version() -> str:
    """Installed wonderwords version, recorded in sample metadata because it changes the words."""
    try:
        return importlib.metadata.version("wonderwords")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover
        return "unknown"


@cache
def _niah_key_parts() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Sorted unique adjectives and nouns whose ``f"{adj}-{noun}"`` pairs form RULER's niah words.

    RULER materialises ``sorted(set(adj-noun pairs))`` (~6.2M strings, ~0.5 GB) and calls
    ``random.choice`` on it. With wonderwords' lists no two (adj, noun) pairs give the same string
    (checked in the tests), so drawing a uniform pair index is the same distribution without the list.
    """
    adjs = tuple(sorted(set(_wonderwords_list("adjectivelist.txt"))))
    nouns = tuple(sorted(set(_wonderwords_list("nounlist.txt"))))
    return adjs, nouns


@cache
def _cwe_words(seed: int) -> tuple[str, ...]:
    """RULER's cwe vocabulary: unique nouns+adjectives+verbs, sorted, shuffled with the run seed."""
    words = sorted(
        set(
            _wonderwords_list("nounlist.txt")
            + _wonderwords_list("adjectivelist.txt")
            + _wonderwords_list("verblist.txt")
        )
    )
    random.Random(seed).shuffle(words)
    return tuple(words)


def _random_needle(kind: NeedleType, rng: random.Random) -> str:
    """A random key/value of RULER's three kinds: 7-digit number, adj-noun word, or UUID4."""
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "words":
        adjs, nouns = _niah_key_parts()
        i = rng.randrange(len(adjs) * len(nouns))
        return f"{adjs[i // len(nouns)]}-{nouns[i % len(nouns)]}"
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(f"unknown needle type {kind!r}")


# --------------------------------------------------------------------------------------------------
# Text helpers
# --------------------------------------------------------------------------------------------------

_SENTENCE_END = re.compile(r"[.!?]+[\"')\]]*(?=\s)")


def split_sentences(text: str) -> list[str]:
    """Split text into sentences at ``.``/``!``/``?`` (plus closing quotes/brackets) before whitespace.

    Stand-in for nltk's punkt ``sent_tokenize`` that RULER uses for the essay haystack (nltk data is
    not available offline). Only where needles may be inserted depends on it; pass
    ``sentence_splitter=nltk.sent_tokenize`` to :func:`generate_samples` for RULER's exact splitting.
    """
    text = text.strip()
    sentences: list[str] = []
    start = 0
    for match in _SENTENCE_END.finditer(text):
        piece = text[start : match.end()].strip()
        if piece:
            sentences.append(piece)
        start = match.end()
    tail = text[start:].strip()
    if tail:
        sentences.append(tail)
    return sentences


def _remove_newline_tab(text: str) -> str:
    """RULER's ``--remove_newline_tab``: collapse every run of whitespace to one space."""
    return " ".join(text.replace("\n", " ").replace("\t", " ").strip().split())


def _insert_into_sentences(sentences: Sequence[str], depths: Sequence[int], inserts: Sequence[str]) -> str:
    """RULER's essay insertion: put ``inserts[i]`` before sentence ``int(len * depth / 100)``."""
    positions = [0, *sorted(int(len(sentences) * (depth / 100)) for depth in depths), len(sentences)]
    parts: list[str] = []
    for i in range(1, len(positions)):
        parts.append(" ".join(sentences[positions[i - 1] : positions[i]]))
        if i - 1 < len(inserts):
            parts.append(inserts[i - 1])
    return " ".join(parts)


def riemann_zeta(s: float) -> float:
    """Riemann zeta for ``s > 1`` (Euler-Maclaurin, double precision), replacing ``scipy.special.zeta``.

    Used by fwe to normalise the zeta-distributed word counts exactly as RULER does.
    """
    if s <= 1:
        raise ValueError("zeta(s) diverges for s <= 1")
    n = 20
    total = math.fsum(k**-s for k in range(1, n))
    total += n ** (1 - s) / (s - 1) + 0.5 * n**-s
    # Bernoulli corrections B_2j / (2j)! * s(s+1)...(s+2j-2) * n^(-s-2j+1)
    bernoulli = (1 / 6, -1 / 30, 1 / 42, -1 / 30, 5 / 66, -691 / 2730, 7 / 6)
    rising = s
    for j, b in enumerate(bernoulli, start=1):
        total += b / math.factorial(2 * j) * rising * n ** (-s - 2 * j + 1)
        rising *= (s + 2 * j - 1) * (s + 2 * j)
    return total


# --------------------------------------------------------------------------------------------------
# Generation machinery shared by all tasks
# --------------------------------------------------------------------------------------------------


class _DoesNotFit(Exception):
    """A haystack size that cannot be built (e.g. more cwe words than the vocabulary has)."""


@dataclass
class _Built:
    """A full candidate text (prompt + answer prefix) with its references and metadata."""

    text: str
    outputs: list[str]
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Ctx:
    """Everything one ``(task, length, seed)`` run needs, so generators stay pure functions of it + an RNG."""

    spec: TaskSpec
    length: int
    seed: int
    count: Callable[[str], int]
    reserve_tokens: int
    model_template: str
    remove_newline_tab: bool
    haystack_words: list[str] | None
    sentence_splitter: Callable[[str], list[str]]
    cwe_extra_words: tuple[str, ...] | None
    shrink_step: int | None = None

    @property
    def budget(self) -> int:
        """RULER's ``max_seq_length`` after subtracting ``model_template_token`` (our reserve)."""
        return self.length - self.reserve_tokens

    @property
    def ttg(self) -> int:
        return self.spec.tokens_to_generate

    def template(self) -> str:
        """RULER's ``model_template.format(task_template=...) + answer_prefix``."""
        return self.model_template.replace("{task_template}", self.spec.template) + self.spec.answer_prefix

    def finish(self, text: str) -> str:
        return _remove_newline_tab(text) if self.remove_newline_tab else text

    def tokens(self, text: str) -> int:
        return self.count(self.finish(text))

    def essay_sentences(self, num_words: int) -> list[str]:
        """First ``num_words`` essay words (the essay repeated if too short, as RULER now does), split."""
        words = self.haystack_words
        if not words:
            raise ValueError(
                f"task {self.spec.name!r} uses the essay haystack: pass haystack_text=..., or use "
                "get_task(name).with_args(type_haystack='noise')"
            )
        if num_words > len(words):
            words = words * (-(-num_words // len(words)))
        return self.sentence_splitter(" ".join(words[:num_words]).strip())


def _largest_fitting(fits: Callable[[int], bool], lo: int, hi: int) -> int | None:
    """RULER's binary search for the largest haystack size whose prompt fits the budget."""
    best = None
    while lo <= hi:
        mid = (lo + hi) // 2
        if fits(mid):
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    return best


def _search(ctx: _Ctx, fits: Callable[[int], bool], incremental: int, upper: int, min_size: int) -> int:
    """Binary search in ``[incremental, upper]`` like RULER, then below ``incremental`` if nothing fits.

    RULER never goes below ``incremental`` (it would loop forever at such lengths); searching down to
    ``min_size`` is what lets short lengths such as 256 tokens work at all.
    """

    def safe_fits(size: int) -> bool:
        try:
            return fits(size)
        except _DoesNotFit:
            return False

    best = _largest_fitting(safe_fits, incremental, upper)
    if best is None and min_size < incremental:
        best = _largest_fitting(safe_fits, min_size, incremental - 1)
    if best is None:
        raise ValueError(f"task {ctx.spec.name!r} cannot fit in {ctx.length} tokens (budget {ctx.budget})")
    return best


def _estimate_upper(ctx: _Ctx, build: Callable[[int], _Built], probe: int) -> int:
    """RULER's upper bound for the search: 3x the size that tokens-per-unit at ``probe`` predicts."""
    per_unit = ctx.tokens(build(probe).text) / probe
    return max(int((ctx.budget / per_unit) * 3), probe * 2)


def _fit_sample(
    ctx: _Ctx,
    build: Callable[[int], _Built],
    start: int,
    incremental: int,
    min_size: int,
) -> tuple[_Built, str, int, int]:
    """RULER's per-sample loop: rebuild with ``incremental`` fewer units until prompt + answer fits.

    Returns the candidate, its final text, its token count and the size used. Below ``incremental``
    the size shrinks one unit at a time (RULER would spin forever there). ``ctx.shrink_step``, when
    set, replaces ``incremental`` as the step (RULER's 500-word essay step can halve a short prompt).
    """
    step = ctx.shrink_step or incremental
    size = start
    while True:
        built = build(size)
        text = ctx.finish(built.text)
        n_tokens = ctx.count(text)
        if n_tokens + ctx.ttg <= ctx.budget:
            return built, text, n_tokens, size
        size = size - step if size > step else size - 1
        if size < min_size:
            raise ValueError(f"task {ctx.spec.name!r}: no sample fits in {ctx.length} tokens")


# --------------------------------------------------------------------------------------------------
# NIAH
# --------------------------------------------------------------------------------------------------


def _niah_build(ctx: _Ctx, args: NiahArgs, size: int, rng: random.Random) -> _Built:
    """One niah text with ``size`` haystack units, consuming ``rng`` in RULER's order."""
    num_k = max(args.num_needle_k, args.num_needle_q)
    plural = args.type_needle_v
    keys: list[str] = []
    values: list[list[str]] = []
    needles: list[str] = []
    for _ in range(num_k):
        keys.append(_random_needle(args.type_needle_k, rng))
        values.append([])
        for _ in range(args.num_needle_v):
            values[-1].append(_random_needle(args.type_needle_v, rng))
            needles.append(NIAH_NEEDLE.format(type_needle_v=plural, key=keys[-1], value=values[-1][-1]))
    # RULER shuffles the needles with a fresh Random(run seed): a fixed permutation, kept for fidelity.
    random.Random(ctx.seed).shuffle(needles)

    if args.type_haystack == "essay":
        sentences = ctx.essay_sentences(size)
        context = _insert_into_sentences(sentences, rng.sample(DEPTHS, len(needles)), needles)
    else:
        if args.type_haystack == "noise":
            lines = [NOISE_HAYSTACK] * size
        elif args.type_haystack == "needle":
            lines = [
                NIAH_NEEDLE.format(
                    type_needle_v=plural,
                    key=_random_needle(args.type_needle_k, rng),
                    value=_random_needle(args.type_needle_v, rng),
                )
                for _ in range(size)
            ]
        else:
            raise ValueError(f"unknown haystack type {args.type_haystack!r}")
        for position, needle in zip(sorted(rng.sample(range(size), len(needles)), reverse=True), needles, strict=True):
            lines.insert(position, needle)
        context = "\n".join(lines)

    chosen = rng.sample(range(num_k), args.num_needle_q)
    queries = [keys[i] for i in chosen]
    answers = [value for i in chosen for value in values[i]]
    query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]

    template = ctx.template()
    type_needle_v = plural
    if args.num_needle_q * args.num_needle_v == 1:
        # RULER rewrites the whole (model + task + prefix) template to the singular.
        for old, new in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
            template = template.replace(old, new)
        type_needle_v = plural[:-1]
    text = template.format(type_needle_v=type_needle_v, context=context, query=query)
    return _Built(text, answers, {"query": query, "num_needles": len(needles)})


def _niah_setup(ctx: _Ctx, rng: random.Random) -> dict[str, Any]:
    args = ctx.spec.args
    assert isinstance(args, NiahArgs)
    incremental = {"essay": 500, "noise": 25, "needle": 25}[args.type_haystack]
    if args.type_haystack != "essay" and ctx.length < 4096:
        incremental = 5
    min_size = 1 if args.type_haystack == "essay" else max(args.num_needle_k, args.num_needle_q) * args.num_needle_v

    def build(size: int) -> _Built:
        return _niah_build(ctx, args, size, rng)

    upper = _estimate_upper(ctx, build, incremental)
    size = _search(ctx, lambda n: ctx.tokens(build(n).text) + ctx.ttg <= ctx.budget, incremental, upper, min_size)
    return {"size": size, "incremental": incremental, "min_size": min_size}


def _niah_sample(ctx: _Ctx, state: dict[str, Any], rng: random.Random) -> tuple[_Built, str, int, int]:
    args = ctx.spec.args
    assert isinstance(args, NiahArgs)
    return _fit_sample(
        ctx, lambda n: _niah_build(ctx, args, n, rng), state["size"], state["incremental"], state["min_size"]
    )


# --------------------------------------------------------------------------------------------------
# Variable tracking
# --------------------------------------------------------------------------------------------------


def _vt_chains(
    rng: random.Random, num_chains: int, num_hops: int, is_icl: bool
) -> tuple[list[list[str]], list[list[str]]]:
    """Variable names and ``VAR X = ...`` statements of each chain (RULER's ``generate_chains``).

    Names are distinct: RULER appends extra names on a collision but keeps the duplicate, which can
    yield a repeated name and a spurious extra chain; skipping duplicates avoids that rare corruption.
    """
    length = 3 if is_icl else 5
    hops = min(10, num_hops) if is_icl else num_hops
    names: list[str] = []
    while len(names) < num_chains * (hops + 1):
        name = "".join(rng.choices(string.ascii_uppercase, k=length))
        if name not in names:
            names.append(name)
    variables: list[list[str]] = []
    chains: list[list[str]] = []
    for c in range(num_chains):
        chain_vars = names[c * (hops + 1) : (c + 1) * (hops + 1)]
        value = "12345" if is_icl else str(rng.randint(10000, 99998))  # np.random.randint(10000, 99999)
        statements = [f"VAR {chain_vars[0]} = {value}"]
        statements += [f"VAR {chain_vars[j + 1]} = VAR {chain_vars[j]} " for j in range(hops)]
        variables.append(chain_vars)
        chains.append(statements)
    return variables, chains


def _interleave_chains(chains: Sequence[Sequence[str]], rng: random.Random) -> list[str]:
    """Random interleaving that keeps each chain's order (RULER's ``shuffle_sublists_heap``)."""
    heap = [(rng.random(), i, 0) for i in range(len(chains))]
    heapq.heapify(heap)
    merged: list[str] = []
    while heap:
        _, i, j = heapq.heappop(heap)
        merged.append(chains[i][j])
        if j + 1 < len(chains[i]):
            heapq.heappush(heap, (rng.random(), i, j + 1))
    return merged


def _vt_build(ctx: _Ctx, args: VTArgs, size: int, rng: random.Random, is_icl: bool) -> _Built:
    variables, chains = _vt_chains(rng, args.num_chains, args.num_hops, is_icl)
    value = chains[0][0].split("=")[-1].strip()
    if args.type_haystack == "essay":
        sentences = ctx.essay_sentences(size)
        flat = _interleave_chains(chains, rng)
        context = _insert_into_sentences(
            sentences, rng.sample(DEPTHS, len(flat)), [statement.strip() + "." for statement in flat]
        )
    elif args.type_haystack == "noise":
        lines = [NOISE_HAYSTACK] * size
        for chain in chains:
            positions = sorted(rng.sample(range(len(lines)), len(chain)))
            for j, position in enumerate(positions):
                lines.insert(position + j, chain[j])
        context = "\n".join(lines)
    else:
        raise ValueError(f"unknown haystack type {args.type_haystack!r}")
    context = context.replace(". \n", ".\n")
    # RULER's one-shot example never carries the model (chat) template.
    template = VT_TEMPLATE + VT_ANSWER_PREFIX if is_icl else ctx.template()
    hops = min(10, args.num_hops) if is_icl else args.num_hops
    text = template.format(context=context, query=value, num_v=hops + 1)
    return _Built(text, list(variables[0]), {"value": value})


def _vt_randomize_icl(example: str, hops: int, rng: random.Random) -> str:
    """RULER's ``randomize_icl``: fresh names for the answer variables and a fresh value per sample."""
    for item in example.strip().split()[-(hops + 1) :]:
        example = example.replace(item, "".join(rng.choices(string.ascii_uppercase, k=len(item))))
    return example.replace("12345", str(rng.randint(10000, 99998)))


def _vt_setup(ctx: _Ctx, rng: random.Random) -> dict[str, Any]:
    args = ctx.spec.args
    assert isinstance(args, VTArgs)
    essay = args.type_haystack == "essay"
    min_size = 1 if essay else args.num_hops + 1
    icl_example = ""
    example_tokens = 0
    if args.add_fewshot:
        # The one-shot example is generated once per run at a 500-token budget with no answer budget.
        icl_ctx = replace(ctx, length=500, spec=replace(ctx.spec, tokens_to_generate=0))
        icl_hops = min(10, args.num_hops)

        def build_icl(size: int) -> _Built:
            return _vt_build(icl_ctx, args, size, rng, is_icl=True)

        icl_incremental = 50 if essay else 5
        icl_min = 1 if essay else icl_hops + 1
        upper = _estimate_upper(icl_ctx, build_icl, icl_incremental)
        try:
            size = _search(
                icl_ctx, lambda n: icl_ctx.tokens(build_icl(n).text) <= icl_ctx.budget, icl_incremental, upper, icl_min
            )
        except ValueError:
            raise ValueError(
                f"task {ctx.spec.name!r} cannot fit its one-shot example in RULER's 500-token budget with this "
                "tokenizer (the example alone takes more)"
            ) from None
        built, text, _, _ = _fit_sample(icl_ctx, build_icl, size, icl_incremental, icl_min)
        icl_example = text + " " + " ".join(built.outputs) + "\n"
        example_tokens = ctx.count(icl_example)

    incremental = 500 if essay else 10
    if not essay and ctx.length < 4096:
        incremental = 5

    def build(size: int) -> _Built:
        return _vt_build(ctx, args, size, rng, is_icl=False)

    upper = _estimate_upper(ctx, build, incremental)
    size = _search(
        ctx,
        lambda n: ctx.tokens(build(n).text) + example_tokens + ctx.ttg <= ctx.budget,
        incremental,
        upper,
        min_size,
    )
    return {"size": size, "incremental": incremental, "min_size": min_size, "icl_example": icl_example}


def _vt_sample(ctx: _Ctx, state: dict[str, Any], rng: random.Random) -> tuple[_Built, str, int, int]:
    args = ctx.spec.args
    assert isinstance(args, VTArgs)

    def build(size: int) -> _Built:
        built = _vt_build(ctx, args, size, rng, is_icl=False)
        if state["icl_example"]:
            cutoff = built.text.index(VT_TEMPLATE[:20])  # after the model template, before the task
            example = _vt_randomize_icl(state["icl_example"], min(10, args.num_hops), rng)
            built.text = built.text[:cutoff] + example + "\n" + built.text[cutoff:]
        return built

    return _fit_sample(ctx, build, state["size"], state["incremental"], state["min_size"])


# --------------------------------------------------------------------------------------------------
# Common words extraction
# --------------------------------------------------------------------------------------------------


def _cwe_list(
    ctx: _Ctx, rng: random.Random, num_words: int, common_repeats: int, uncommon_repeats: int, num_common: int
) -> tuple[str, list[str]]:
    """RULER's ``get_example``: a numbered word list where the first ``num_common`` words repeat more."""
    words = _cwe_words(ctx.seed)
    if num_words <= len(words):
        chosen = rng.sample(words, num_words)
    elif ctx.cwe_extra_words is not None and num_words <= len(ctx.cwe_extra_words):
        # RULER switches to its (LFS-stored) english_words.json here; the caller may supply such a list.
        chosen = rng.sample(ctx.cwe_extra_words, num_words)
    else:
        raise _DoesNotFit(num_words)
    common, uncommon = chosen[:num_common], chosen[num_common:]
    word_list = common * common_repeats + uncommon * uncommon_repeats
    # RULER shuffles with a fresh Random(run seed): for a given list size every sample gets the same
    # slot permutation (only the words differ). Kept for fidelity.
    random.Random(ctx.seed).shuffle(word_list)
    return " ".join(f"{i + 1}. {word}" for i, word in enumerate(word_list)), common


def _cwe_build(ctx: _Ctx, args: CWEArgs, num_words: int, rng: random.Random) -> _Built:
    if ctx.length < 4096:
        shot_shape, repeats = (20, 3, 1), (6, 1)
    else:
        shot_shape, repeats = (40, 10, 3), (args.freq_cw, args.freq_ucw)
    template = ctx.template()
    shots = []
    for _ in range(args.num_fewshot):
        shot_context, shot_answer = _cwe_list(ctx, rng, *shot_shape, args.num_cw)
        shot = template.format(num_cw=args.num_cw, context=shot_context, query="")
        shots.append(shot + " " + " ".join(f"{i + 1}. {word}" for i, word in enumerate(shot_answer)))
    context, answer = _cwe_list(ctx, rng, num_words, *repeats, args.num_cw)
    text = "\n".join(shots) + "\n" + template.format(num_cw=args.num_cw, context=context, query="")
    return _Built(text, answer, {"num_words": num_words, "repeats": list(repeats)})


def _cwe_setup(ctx: _Ctx, rng: random.Random) -> dict[str, Any]:
    args = ctx.spec.args
    assert isinstance(args, CWEArgs)
    incremental = 10
    per_word = ctx.tokens(_cwe_build(ctx, args, 4096, rng).text) / 4096
    upper = max(int(ctx.budget // per_word) * 2, incremental * 2)
    capped = False

    def fits(num_words: int) -> bool:
        nonlocal capped
        try:
            return ctx.tokens(_cwe_build(ctx, args, num_words, rng).text) + ctx.ttg <= ctx.budget
        except _DoesNotFit:
            capped = True
            raise

    size = _search(ctx, fits, incremental, upper, min_size=args.num_cw)
    vocabulary = max(len(_cwe_words(ctx.seed)), len(ctx.cwe_extra_words or ()))
    if capped and size + incremental > vocabulary:
        warnings.warn(
            f"cwe at {ctx.length} tokens is capped at {size} words (all available words); pass a larger "
            "cwe_extra_words=... (RULER uses its english_words.json) to fill the length",
            stacklevel=3,
        )
    return {"size": size, "incremental": incremental, "min_size": args.num_cw}


def _cwe_sample(ctx: _Ctx, state: dict[str, Any], rng: random.Random) -> tuple[_Built, str, int, int]:
    args = ctx.spec.args
    assert isinstance(args, CWEArgs)
    return _fit_sample(
        ctx, lambda n: _cwe_build(ctx, args, n, rng), state["size"], state["incremental"], state["min_size"]
    )


# --------------------------------------------------------------------------------------------------
# Frequent words extraction
# --------------------------------------------------------------------------------------------------


def _fwe_vocab(ctx: _Ctx, args: FWEArgs, vocab_size: int, rng: random.Random) -> list[str]:
    """Random coded words, sorted, shuffled with the run seed; rank 0 becomes the '...' noise word."""
    vocab = ["".join(rng.choices(string.ascii_lowercase, k=args.coded_wordlen)) for _ in range(vocab_size)]
    while len(set(vocab)) < vocab_size:
        vocab.append("".join(rng.choices(string.ascii_lowercase, k=args.coded_wordlen)))
    vocab = sorted(set(vocab))
    random.Random(ctx.seed).shuffle(vocab)
    vocab[0] = "..."
    return vocab


def _fwe_text(ctx: _Ctx, args: FWEArgs, vocab: Sequence[str], num_words: int) -> _Built:
    """Word ``k`` (1-based rank) appears ``int(num_words * k**-alpha / zeta(alpha))`` times."""
    zeta = riemann_zeta(args.alpha)
    words = [word for k, word in enumerate(vocab, start=1) for _ in range(int(num_words * (k**-args.alpha) / zeta))]
    random.Random(ctx.seed).shuffle(words)
    text = ctx.template().format(context=" ".join(words), query="")
    return _Built(text, list(vocab[1:4]), {"num_words": num_words, "vocab_size": len(vocab)})


def _fwe_params(ctx: _Ctx, args: FWEArgs) -> tuple[int, int, int]:
    """(prompt budget, vocab size, step) as RULER derives them from ``max_seq_length``."""
    budget = ctx.budget - ctx.ttg
    vocab_size = budget // 50 if args.vocab_size == -1 else args.vocab_size
    step = budget // 32
    if vocab_size < 4 or step < 1:
        raise ValueError(f"task {ctx.spec.name!r} cannot fit in {ctx.length} tokens")
    return budget, vocab_size, step


def _fwe_setup(ctx: _Ctx, rng: random.Random) -> dict[str, Any]:
    """RULER's upward linear search: grow by ``budget // 32`` words until the budget is reached."""
    args = ctx.spec.args
    assert isinstance(args, FWEArgs)
    budget, vocab_size, step = _fwe_params(ctx, args)
    vocab = _fwe_vocab(ctx, args, vocab_size, rng)
    num_words = budget // args.coded_wordlen
    while ctx.tokens(_fwe_text(ctx, args, vocab, num_words).text) < budget:
        num_words += step
    return {"size": num_words - step}


def _fwe_sample(ctx: _Ctx, state: dict[str, Any], rng: random.Random) -> tuple[_Built, str, int, int]:
    """RULER's per-sample step: fresh vocabulary, shrink by the step while over the prompt budget."""
    args = ctx.spec.args
    assert isinstance(args, FWEArgs)
    budget, vocab_size, step = _fwe_params(ctx, args)
    vocab = _fwe_vocab(ctx, args, vocab_size, rng)
    num_words = state["size"]
    while True:
        if num_words <= 0:
            raise ValueError(f"task {ctx.spec.name!r}: no sample fits in {ctx.length} tokens")
        built = _fwe_text(ctx, args, vocab, num_words)
        text = ctx.finish(built.text)
        n_tokens = ctx.count(text)
        if n_tokens <= budget:
            return built, text, n_tokens, num_words
        num_words -= step


# --------------------------------------------------------------------------------------------------
# Passkey
# --------------------------------------------------------------------------------------------------


def _passkey_build(ctx: _Ctx, args: PasskeyArgs, size: int, rng: random.Random) -> _Built:
    """Task line, ``pos`` noise sentences, the key line, ``size - pos`` noise sentences, question."""
    key = str(rng.randint(10 ** (args.num_digits - 1), 10**args.num_digits - 1))
    position = rng.randint(0, size)
    before = " ".join([NOISE_HAYSTACK] * position)
    after = " ".join([NOISE_HAYSTACK] * (size - position))
    context = "\n".join([before, PASSKEY_NEEDLE.format(key=key), after])
    text = ctx.template().format(context=context)
    return _Built(text, [key], {"depth": position / size if size else 0.0})


def _passkey_setup(ctx: _Ctx, rng: random.Random) -> dict[str, Any]:
    args = ctx.spec.args
    assert isinstance(args, PasskeyArgs)
    incremental = 25 if ctx.length >= 4096 else 5

    def build(size: int) -> _Built:
        return _passkey_build(ctx, args, size, rng)

    upper = _estimate_upper(ctx, build, incremental)
    size = _search(ctx, lambda n: ctx.tokens(build(n).text) + ctx.ttg <= ctx.budget, incremental, upper, 0)
    return {"size": size, "incremental": incremental, "min_size": 0}


def _passkey_sample(ctx: _Ctx, state: dict[str, Any], rng: random.Random) -> tuple[_Built, str, int, int]:
    args = ctx.spec.args
    assert isinstance(args, PasskeyArgs)
    return _fit_sample(
        ctx, lambda n: _passkey_build(ctx, args, n, rng), state["size"], state["incremental"], state["min_size"]
    )


_SetupFn = Callable[[_Ctx, random.Random], dict[str, Any]]
_SampleFn = Callable[[_Ctx, dict[str, Any], random.Random], tuple[_Built, str, int, int]]

_GENERATORS: dict[str, tuple[_SetupFn, _SampleFn]] = {
    "niah": (_niah_setup, _niah_sample),
    "variable_tracking": (_vt_setup, _vt_sample),
    "common_words_extraction": (_cwe_setup, _cwe_sample),
    "freq_words_extraction": (_fwe_setup, _fwe_sample),
    "passkey": (_passkey_setup, _passkey_sample),
}


# --------------------------------------------------------------------------------------------------
# Public generation API
# --------------------------------------------------------------------------------------------------


def generate_samples(
    task: str | TaskSpec,
    tokenizer: TokenizerLike,
    length: int,
    num_samples: int,
    *,
    seed: int = 42,
    start_index: int = 0,
    haystack_text: str | None = None,
    model_template: str = BASE_MODEL_TEMPLATE,
    reserve_tokens: int = 0,
    remove_newline_tab: bool = False,
    sentence_splitter: Callable[[str], list[str]] | None = None,
    cwe_extra_words: Iterable[str] | None = None,
    shrink_step: int | None = None,
) -> list[RulerSample]:
    """Generate samples ``start_index .. start_index + num_samples - 1`` of ``task`` at ``length`` tokens.

    Args:
        task: a name from :data:`TASKS` or a :class:`TaskSpec` (e.g. ``get_task(n).with_args(...)``).
        tokenizer: HF tokenizer (tokens counted with ``.tokenize``, i.e. without BOS, as RULER) or a
            ``str -> int`` counter.
        length: RULER's ``max_seq_length``: prompt + answer prefix + ``max_new_tokens`` fit in it.
        seed: RULER's ``--random_seed``; with ``task``, ``length`` and the index it fixes a sample.
        haystack_text: essay text for essay-haystack tasks (RULER uses Paul Graham essays).
        model_template: RULER-style wrapper with ``{task_template}`` (default: RULER's ``base``).
        reserve_tokens: tokens kept free (RULER's ``model_template_token``; e.g. 1 for a BOS token).
        remove_newline_tab: RULER's ``--remove_newline_tab``.
        sentence_splitter: sentence tokenizer for essays (default :func:`split_sentences`).
        cwe_extra_words: larger word list RULER switches to when cwe needs more words than wonderwords
            has (only above ~100K tokens); without it cwe prompts are capped at the vocabulary size.
        shrink_step: haystack units removed per retry when a sample overflows (niah, vt, cwe, passkey).
            ``None`` keeps RULER's step (its search ``incremental``: 500 essay words, 25 or 5 noise
            lines, 10 words); a small value keeps overflowing samples close to ``length``.

    The size search runs once per call from an RNG derived from ``(task, length, seed)``; each sample
    then uses its own RNG derived from ``(task, length, seed, index)``, so a sample does not depend on
    ``num_samples`` or ``start_index``.
    """
    spec = get_task(task)
    if length <= 0 or num_samples < 0:
        raise ValueError("length must be positive and num_samples non-negative")
    words = re.sub(r"\s+", " ", haystack_text).split(" ") if haystack_text else None
    ctx = _Ctx(
        spec=spec,
        length=length,
        seed=seed,
        count=_token_counter(tokenizer),
        reserve_tokens=reserve_tokens,
        model_template=model_template,
        remove_newline_tab=remove_newline_tab,
        haystack_words=words,
        sentence_splitter=sentence_splitter or split_sentences,
        cwe_extra_words=tuple(cwe_extra_words) if cwe_extra_words is not None else None,
        shrink_step=shrink_step,
    )
    setup, make = _GENERATORS[spec.kind]
    state = setup(ctx, _derive_rng("ruler", spec.name, length, seed, "setup"))
    prefix_marker = spec.answer_prefix[:10]
    samples = []
    for index in range(start_index, start_index + num_samples):
        built, text, n_tokens, size = make(ctx, state, _derive_rng("ruler", spec.name, length, seed, "sample", index))
        # Split off the answer prefix the way RULER does: last occurrence of its first 10 characters.
        cut = text.rfind(prefix_marker)
        prompt, answer_prefix = text[:cut], text[cut:]
        meta: dict[str, Any] = {
            "kind": spec.kind,
            "haystack_size": size,
            "ruler_length": n_tokens + spec.tokens_to_generate,
            "wonderwords": wonderwords_version(),
            **built.meta,
        }
        if spec.kind == "niah":
            found = prompt.find(built.outputs[0])
            meta["token_position_answer"] = ctx.count(prompt[:found]) if found >= 0 else -1
        samples.append(
            RulerSample(
                task=spec.name,
                index=index,
                seed=seed,
                length=length,
                prompt=prompt,
                answer_prefix=answer_prefix,
                outputs=tuple(built.outputs),
                prompt_tokens=n_tokens,
                max_new_tokens=spec.tokens_to_generate,
                metric=spec.metric,
                metadata=meta,
            )
        )
    return samples


def generate_sample(
    task: str | TaskSpec, tokenizer: TokenizerLike, length: int, index: int, **kwargs: Any
) -> RulerSample:
    """One sample (same as ``generate_samples(..., start_index=index, num_samples=1)[0]``)."""
    return generate_samples(task, tokenizer, length, 1, start_index=index, **kwargs)[0]


# --------------------------------------------------------------------------------------------------
# Scoring (RULER's scripts/eval)
# --------------------------------------------------------------------------------------------------

_NON_PRINTABLE = re.compile(r"[\x00-\x1f]")


def postprocess_pred(prediction: str) -> str:
    """RULER's ``postprocess_pred``: strip, turn control characters into newlines, strip again."""
    return _NON_PRINTABLE.sub("\n", prediction.strip()).strip()


def _check(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> None:
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions for {len(refs)} reference lists")
    if not preds:
        raise ValueError("no predictions to score")
    if any(len(ref) == 0 for ref in refs):
        raise ValueError("every sample needs at least one reference")


def sample_score(prediction: str, references: Sequence[str], metric: MetricName = "string_match_all") -> float:
    """Per-sample score in [0, 1]: fraction of references found (all) or 1.0 if any is found (part).

    Matching is case-insensitive substring search on the prediction as given (post-process it first).
    Duplicate references count separately, and an empty reference string is always "found".
    """
    if not references:
        raise ValueError("every sample needs at least one reference")
    pred = prediction.lower()
    hits = [1.0 if ref.lower() in pred else 0.0 for ref in references]
    if metric == "string_match_all":
        return sum(hits) / len(hits)
    if metric == "string_match_part":
        return max(hits)
    raise ValueError(f"unknown metric {metric!r}")


def string_match_all(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """RULER's metric for niah/vt/cwe/fwe: mean fraction of references found, in percent, 2 decimals."""
    _check(preds, refs)
    return round(
        sum(sample_score(p, r, "string_match_all") for p, r in zip(preds, refs, strict=True)) / len(preds) * 100, 2
    )


def string_match_part(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """RULER's metric for qa: share of samples where any reference is found, in percent, 2 decimals."""
    _check(preds, refs)
    return round(
        sum(sample_score(p, r, "string_match_part") for p, r in zip(preds, refs, strict=True)) / len(preds) * 100, 2
    )


_METRIC_FNS: dict[str, Callable[[Sequence[str], Sequence[Sequence[str]]], float]] = {
    "string_match_all": string_match_all,
    "string_match_part": string_match_part,
}


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------

GenerateFn = Callable[[RulerSample], str]


@dataclass(frozen=True)
class SampleResult:
    """Prediction and score of one sample (``prediction`` is post-processed as RULER does)."""

    task: str
    index: int
    length: int
    raw_prediction: str
    prediction: str
    references: tuple[str, ...]
    score: float


@dataclass(frozen=True)
class TaskScore:
    """RULER's summary row for one task at one length: score in percent and ``nulls`` (empty preds)."""

    task: str
    length: int
    metric: MetricName
    score: float
    num_samples: int
    nulls: str


@dataclass(frozen=True)
class EvalReport:
    results: tuple[SampleResult, ...]
    scores: Mapping[str, Mapping[int, TaskScore]]

    def average(self, length: int) -> float:
        """Unweighted mean of task scores at ``length`` (RULER's reported average over tasks)."""
        values = [by_len[length].score for by_len in self.scores.values() if length in by_len]
        if not values:
            raise KeyError(f"no scores at length {length}")
        return round(sum(values) / len(values), 2)


def evaluate(
    generate_fn: GenerateFn,
    samples: Iterable[RulerSample],
    *,
    on_result: Callable[[SampleResult], None] | None = None,
) -> EvalReport:
    """Run ``generate_fn`` on each sample, post-process and score like RULER's ``evaluate.py``.

    ``generate_fn(sample)`` must return only the continuation after ``sample.input_text`` (it is
    responsible for appending the answer prefix, see :func:`make_hf_generate_fn`). Scores are grouped
    per (task, length) because RULER reports each length separately.
    """
    results: list[SampleResult] = []
    groups: dict[tuple[str, int], list[tuple[RulerSample, SampleResult]]] = defaultdict(list)
    for sample in samples:
        raw = generate_fn(sample)
        pred = postprocess_pred(raw)
        result = SampleResult(
            sample.task,
            sample.index,
            sample.length,
            raw,
            pred,
            sample.outputs,
            sample_score(pred, sample.outputs, sample.metric),
        )
        results.append(result)
        groups[(sample.task, sample.length)].append((sample, result))
        if on_result is not None:
            on_result(result)
    scores: dict[str, dict[int, TaskScore]] = defaultdict(dict)
    for (task, length), items in groups.items():
        metric = items[0][0].metric
        preds = [r.prediction for _, r in items]
        refs = [list(s.outputs) for s, _ in items]
        nulls = f"{sum(len(p) == 0 for p in preds)}/{len(preds)}"
        scores[task][length] = TaskScore(task, length, metric, _METRIC_FNS[metric](preds, refs), len(items), nulls)
    return EvalReport(tuple(results), {task: dict(v) for task, v in scores.items()})


def make_hf_generate_fn(
    model: Any,
    tokenizer: Any,
    *,
    stop: Sequence[str] = (),
    add_special_tokens: bool = True,
) -> GenerateFn:
    """Greedy, batch-1 HF generation in the manner of RULER's ``HuggingFaceModel``.

    The prompt is ``sample.prompt + sample.answer_prefix`` tokenized with the tokenizer's special
    tokens (BOS), ``max_new_tokens = sample.max_new_tokens``, greedy decoding, and only the new tokens
    are decoded (``skip_special_tokens=True``). ``stop`` strings cut the text like RULER's
    ``--stop_words`` (empty by default, as in RULER's config).
    """
    import torch
    from transformers import GenerationConfig

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos_id = getattr(getattr(model, "generation_config", None), "eos_token_id", None) or tokenizer.eos_token_id

    def generate(sample: RulerSample) -> str:
        encoded = tokenizer(sample.input_text, return_tensors="pt", add_special_tokens=add_special_tokens)
        encoded = {k: v.to(model.device) for k, v in encoded.items() if k in ("input_ids", "attention_mask")}
        config = GenerationConfig(
            max_new_tokens=sample.max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad_id, eos_token_id=eos_id
        )
        with torch.inference_mode():
            output = model.generate(**encoded, generation_config=config)
        text = tokenizer.decode(output[0, encoded["input_ids"].shape[1] :], skip_special_tokens=True)
        for word in stop:
            text = text.split(word)[0]
        return text

    return generate
