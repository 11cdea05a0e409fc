"""upcycle's task layer over the RULER generators: names and aliases, lengths with special tokens, haystacks,
scoring, per-length runs with FFN statistics, the position-limit check."""

from __future__ import annotations

import pytest

from upcycle.eval import ruler, tasks
from upcycle.testing import tiny_model


def test_names_and_aliases():
    assert set(tasks.TASKS) == set(ruler.TASKS) and "passkey" in tasks.TASKS
    assert tasks.resolve("niah") == "niah_single_1" and tasks.resolve("niah-multikey") == "niah_multikey_2"
    assert tasks.resolve("cwe") == "cwe" and tasks.resolve("vt") == "vt"
    with pytest.raises(ValueError, match="unknown task 'needle'"):
        tasks.resolve("needle")
    assert set(tasks.ESSAY_TASKS) == {"niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multivalue",
                                      "niah_multiquery"}


@pytest.mark.parametrize("task,length", [("niah", 512), ("niah_multikey_3", 1024), ("passkey", 512), ("fwe", 512),
                                         ("vt", 1024), ("cwe", 1024)])
def test_sample_fits_length_and_holds_answer(task, length, tok):
    tokenizer = tok
    samples = tasks.generate(task, tokenizer, length, n=2, seed=3)
    special = tasks.special_tokens(tokenizer)
    for s in samples:
        fed = len(tokenizer(s.input_text)["input_ids"])  # what generation feeds: with special tokens
        assert fed == s.prompt_tokens + special and fed + s.max_new_tokens <= length
        assert fed + s.max_new_tokens >= 0.7 * length  # filled (RULER shrinks by whole haystack steps)
        assert s.outputs and all(a in s.prompt for a in s.outputs)
        assert tasks.score(" ".join(s.outputs), s.outputs) == 1.0
        assert s.max_new_tokens == ruler.TASKS[tasks.resolve(task)].tokens_to_generate
    assert samples[0].prompt != samples[1].prompt
    assert tasks.generate(task, tokenizer, length, n=1, seed=3) == samples[:1]  # sample 0 whatever n is


def test_essay_tasks_need_and_use_a_haystack(tokenizer, corpus):
    with pytest.raises(ValueError, match="essay haystack.*--haystack"):
        tasks.generate("niah_single_2", tokenizer, 1024)
    (s,) = tasks.generate("niah_single_2", tokenizer, 1024, haystack=corpus[:3])
    assert ruler.NOISE_HAYSTACK not in s.prompt and s.outputs[0] in s.prompt
    assert tasks.needs_haystack("niah_multivalue") and not tasks.needs_haystack("niah")


def test_scoring_is_rulers():
    """RULER's string_match_all: case-insensitive substring after post-processing (not whole words: a
    reference inside a longer number counts, as in RULER)."""
    assert tasks.score("  The pass key is 12345.\n", ["12345"]) == 1.0
    assert tasks.score("abcde, FGHIJ", ["ABCDE", "fghij", "KLMNO", "PQRST"]) == 0.5
    assert tasks.score("12345678", ["1234567"]) == 1.0
    assert tasks.score("", ["1"]) == 0.0
    assert tasks.score("x", ["a", "x"], "string_match_part") == 1.0


def test_evaluate_with_stubs(tok):
    samples = tasks.generate("vt", tok, 1024, 3)
    r = tasks.evaluate(lambda s: " " + ", ".join(s.outputs), samples)
    assert (r["score"], r["ruler_score"], r["exact_match"], r["n"], r["nulls"]) == (1.0, 100.0, 1.0, 3, 0)
    wrong = tasks.evaluate(lambda s: "\n", samples)
    assert wrong["score"] == 0.0 and wrong["nulls"] == 3
    seen = []
    half = tasks.evaluate(lambda s: " ".join(s.outputs[:2]), samples, on_result=lambda s, p, v: seen.append(v))
    assert half["score"] == pytest.approx(2 / 5) and half["exact_match"] == 0.0 and seen == [0.4] * 3
    assert half["ruler_score"] == 40.0 and half["sample_scores"] == seen


def test_errors(tokenizer):
    with pytest.raises(ValueError, match="unknown task"):
        tasks.generate("needle", tokenizer, 512)
    with pytest.raises(ValueError, match="longer length"):
        tasks.generate("niah", tokenizer, 64)
    with pytest.raises(ValueError, match="longer length"):
        tasks.generate("cwe", tokenizer, 300)
    with pytest.raises(ValueError, match="one-shot example"):  # the vt example alone is over 500 tokens here
        tasks.generate("vt", tokenizer, 4096)


def test_run_reports_per_length_scores_and_layers(tokenizer):
    model = tiny_model("qwen2", vocab_size=len(tokenizer))
    out = tasks.run(model, tokenizer, ["passkey", "niah"], [300, 400], n=1, max_new_tokens=4)
    for task in ("passkey", "niah"):
        assert set(out[task]) == {300, 400}
        r = out[task][400]
        assert r["tokens"] == r["prompt_tokens"] + 3  # the last generated token is never fed back
        assert r["prompt_tokens"] + 4 <= 400
        assert 0.0 <= r["score"] <= 1.0 and r["n"] == 1 and r["ffn_density"] == 1.0
        assert len(r["layers"]) == 2


def test_lengths_beyond_the_positions_need_rope_scaling():
    model = tiny_model("llama", vocab_size=64, max_position_embeddings=512)
    tasks.check_lengths(model, [256, 512])
    with pytest.raises(ValueError, match=r"1024 exceed the model's max_position_embeddings=512.*rope_type"):
        tasks.check_lengths(model, [512, 1024])
    from upcycle import hf

    hf.set_rope(model, rope_scaling={"rope_type": "linear", "factor": 2.0})
    assert tasks.rope_scaled(model.config)
    tasks.check_lengths(model, [1024])
