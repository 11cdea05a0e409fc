from __future__ import annotations

import pytest

from upcycle.eval import tasks
from upcycle.testing import tiny_model


@pytest.mark.parametrize("task", tasks.TASKS)
@pytest.mark.parametrize("length", [512, 1024])
def test_sample_fits_length_and_holds_answer(task, length, tokenizer):
    samples = tasks.generate(task, tokenizer, length, n=2, seed=3)
    for s in samples:
        budget = length - s.max_new_tokens
        assert s.n_tokens == len(tokenizer(s.prompt)["input_ids"]) <= budget
        assert s.n_tokens >= 0.85 * budget  # filled, not just under the limit
        assert all(a in s.prompt for a in s.answers) and s.answers
        assert tasks.score(" ".join(s.answers), s.answers) == 1.0
    assert samples[0].prompt != samples[1].prompt


def test_seeded_and_deterministic(tokenizer):
    a = tasks.generate("niah-multikey", tokenizer, 600, n=2, seed=1)
    assert a == tasks.generate("niah-multikey", tokenizer, 600, n=2, seed=1)
    assert a != tasks.generate("niah-multikey", tokenizer, 600, n=2, seed=2)


def test_task_specifics(tokenizer):
    (mk,) = tasks.generate("niah-multikey", tokenizer, 800, seed=0)
    assert mk.prompt.count("special magic numbers for") == 4 and mk.meta["n_needles"] == 4
    (cwe,) = tasks.generate("cwe", tokenizer, 1024, seed=0)
    lines = [ln.split(". ", 1)[1] for ln in cwe.prompt.splitlines() if ln[:1].isdigit()]
    counts = sorted({w: lines.count(w) for w in lines}.items(), key=lambda kv: -kv[1])
    assert {w for w, _ in counts[:10]} == set(cwe.answers)
    assert counts[9][1] > counts[10][1]  # the 10 common words are strictly more frequent
    (vt,) = tasks.generate("vt", tokenizer, 800, seed=0)
    assert len(vt.answers) == 5 and f"VAR {vt.answers[0]} = " in vt.prompt


def test_haystack_from_corpus(tokenizer, corpus):
    (s,) = tasks.generate("niah", tokenizer, 700, seed=0, haystack=corpus[:3])
    assert "The grass is green" not in s.prompt and s.answers[0] in s.prompt


def test_scoring_stubs(tokenizer):
    samples = tasks.generate("vt", tokenizer, 512, n=3) + tasks.generate("niah", tokenizer, 512, n=3)
    assert tasks.evaluate(lambda s: "they are: " + ", ".join(s.answers), samples)["exact_match"] == 1.0
    wrong = tasks.evaluate(lambda s: "I do not know 0000000", samples)
    assert wrong["score"] == 0.0 and wrong["exact_match"] == 0.0
    half = tasks.evaluate(lambda s: " ".join(s.answers[: len(s.answers) // 2 or 1]), samples[:3])
    assert half["score"] == pytest.approx(2 / 5) and half["exact_match"] == 0.0
    assert tasks.score("12345678", ["1234567"]) == 0.0  # whole words only


def test_errors(tokenizer):
    with pytest.raises(ValueError, match="unknown task"):
        tasks.generate("needle", tokenizer, 512)
    with pytest.raises(ValueError, match="longer length"):
        tasks.generate("niah", tokenizer, 64)


def test_run_reports_per_length_scores_and_layers(tokenizer):
    model = tiny_model("qwen2", vocab_size=len(tokenizer))
    out = tasks.run(model, tokenizer, ["niah", "vt"], [300, 400], n=1, max_new_tokens=4)
    for task in ("niah", "vt"):
        assert set(out[task]) == {300, 400}
        r = out[task][400]
        assert r["tokens"] == r["prompt_tokens"] + 3  # the last generated token is never fed back
        assert 0.0 <= r["score"] <= 1.0 and r["n"] == 1 and r["ffn_density"] == 1.0
        assert len(r["layers"]) == 2


def test_needle_depth(tokenizer):
    for seed in range(4):
        (s,) = tasks.generate("niah", tokenizer, 1024, seed=seed)
        context = s.prompt.split("\n")[1]
        where = context.index(f"is: {s.answers[0]}.") / len(context)
        assert where == pytest.approx(s.meta["depth"], abs=0.05)
    (vt,) = tasks.generate("vt", tokenizer, 1024, seed=0)
    positions = [vt.prompt.index(f"VAR {name} = ") for name in vt.answers]
    assert positions == sorted(positions)  # every assignment comes after the one it reads
