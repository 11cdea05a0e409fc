"""Fixtures for the eval tests: held-out and calibration text; for the RULER tests an offline BPE tokenizer
trained on fixed text (so that the pinned samples do not depend on the Python version's standard library)
and a fixed essay-like haystack."""

from __future__ import annotations

from functools import cache

import pytest
from transformers import PreTrainedTokenizerFast

from upcycle.testing import stdlib_corpus


@pytest.fixture(scope="session")
def heldout_file(tmp_path_factory):
    """Text the tokenizer was not trained on (the corpus fixture is the first 300 KB)."""
    f = tmp_path_factory.mktemp("heldout") / "heldout.txt"
    f.write_text("\n\n".join(stdlib_corpus(max_bytes=20_000, skip_bytes=600_000)))
    return f


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("calib") / "calib.txt"
    f.write_text("\n\n".join(stdlib_corpus(max_bytes=20_000, skip_bytes=700_000)))
    return f


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs on one intra-op thread (see tests/conftest.py: one_thread)."""


# ---------------------------------------------------------------------------------------------- RULER
_ESSAY_PARAGRAPHS = (
    "When I was a kid I thought the most important thing about a program was that it worked. Later I learned "
    "that the real question is whether anyone wants it! Most startups fail because they make something nobody "
    "needs. The founders are smart, and they work hard, but they solve the wrong problem.",
    "Why is that? Partly it's because the problems that are easy to see are the ones that other people have "
    "already seen. The good ideas look like bad ideas at first (which is why they are still available). If you "
    "want to find them you have to notice what seems strange, and then ask why it seems strange.",
    "Writing is a way of thinking. You don't know what you think until you try to write it down, and when you "
    "do, you usually find that you thought less than you believed. That's not a reason to stop; it's the point. "
    "An essay is an attempt, and most attempts miss.",
    "Cities tell you what they value. In one city the message is that you should be richer; in another, that "
    "you should be better looking; in a third, that you should be more important. Where you live shapes what "
    "you become, so choose carefully. Ambition needs an audience.",
)

#: ~250 words of essay-like text; RULER's essay haystack is repeated as needed, so this is enough.
ESSAY_TEXT = "\n\n".join(_ESSAY_PARAGRAPHS)

_EXTRA_CORPUS = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.",
    "One of the special magic numbers for quizzical-aardvark is: 1234567.",
    "Some special magic numbers are hidden within the following text. Make sure to memorize it.",
    "What are all the special magic numbers for wakeful-dog mentioned in the provided text?",
    "VAR ABCDE = 12345 VAR FGHIJ = VAR ABCDE Memorize and track the chain(s) of variable assignment.",
    "Below is a numbered list of words. 1. apple 2. banana 3. cherry 10. dynamic 100. highfalutin",
    "Read the following coded text and track the frequency of each coded word. ... abcdef qwerty zxcvbn",
    "There is an important info hidden inside a lot of irrelevant text. The pass key is 71432. Remember it.",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 25 30 42 50 99 100 123 4096",
    "a1b2c3d4-e5f6-4789-abcd-ef0123456789",
)


def _wonderwords_corpus() -> list[str]:
    """RULER's word lists as training text, so that words cost ~1-3 tokens as with real LLM tokenizers."""
    from importlib.resources import files

    assets = files("wonderwords.assets")
    return [
        " ".join(assets.joinpath(f).read_text().split("\n"))
        for f in ("nounlist.txt", "adjectivelist.txt", "verblist.txt")
    ]


@cache
def ruler_bpe_tokenizer() -> PreTrainedTokenizerFast:
    """GPT-2-style byte-level BPE (vocab 4000) trained on the fixed corpus above and wonderwords' lists."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=4000,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([*_ESSAY_PARAGRAPHS, *_EXTRA_CORPUS] * 3 + _wonderwords_corpus(), trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    hf.model_max_length = 1 << 20
    return hf


@pytest.fixture(scope="session")
def tok():
    """The RULER tests' tokenizer (fixed corpus, vocabulary 4000)."""
    return ruler_bpe_tokenizer()


@pytest.fixture(scope="session")
def essay() -> str:
    return ESSAY_TEXT
