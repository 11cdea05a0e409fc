"""RULER generators and scorers (upcycle.eval.ruler): pinned samples, determinism, length fitting, the
RULER structure of each task, scoring edge cases, the greedy HF generate_fn."""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter
from typing import Any

import pytest
import torch

from upcycle.eval import ruler as rt

LENGTHS = (256, 512, 1024, 2048, 4096)

#: (task, length) pairs that cannot fit with the test tokenizer: the fixed text (template + needles, the
#: vt one-shot example of ~500 tokens, the cwe one-shot example) plus the answer budget exceeds them.
INFEASIBLE = {
    ("niah_single_3", 256),
    ("niah_multikey_1", 256),
    ("niah_multikey_3", 256),
    ("niah_multivalue", 256),
    ("niah_multiquery", 256),
    ("vt", 256),
    ("vt", 512),
    ("cwe", 256),
    ("cwe", 512),
}

#: task -> (length, prompt_tokens, outputs, sha256(input_text)[:16], prompt[:200]) for seed 42, index 0.
EXPECTED = {
    "niah_single_1": (512, 374, ["2603422"], "ffe4d15c66fcfef1",
        "A special magic number is hidden within the following text. Make sure to memorize it. I will quiz you "
        "about the number afterwards.\nOne of the special magic numbers for lovely-proximity is: 2603422.\nTh"),
    "niah_single_2": (512, 382, ["5844761"], "c11ae3fedbf17c7d",
        "A special magic number is hidden within the following text. Make sure to memorize it. I will quiz you "
        "about the number afterwards.\nWhen I was a kid I thought the most important thing about a program w"),
    "niah_single_3": (512, 384, ["8e4ec4e1-47a4-441c-8881-4ed1eb0a3bb3"], "cc6e5f650cbec6c0",
        "A special magic uuid is hidden within the following text. Make sure to memorize it. I will quiz you "
        "about the uuid afterwards.\nWhen I was a kid I thought the most important thing about a program was t"),
    "niah_multikey_1": (512, 377, ["2410713"], "4870b6e64d1cdd44",
        "A special magic number is hidden within the following text. Make sure to memorize it. I will quiz you "
        "about the number afterwards.\nWhen I was a kid I thought the most important thing about a program w"),
    "niah_multikey_2": (512, 355, ["6557552"], "f1e78aa7e315c828",
        "A special magic number is hidden within the following text. Make sure to memorize it. I will quiz you "
        "about the number afterwards.\nOne of the special magic numbers for lacking-difficulty is: 1681267.\n"),
    "niah_multikey_3": (512, 374, ["4dc08bb0-6a10-4f6b-8833-88aa3f275e43"], "3776075e56acda47",
        "A special magic uuid is hidden within the following text. Make sure to memorize it. I will quiz you "
        "about the uuid afterwards.\nOne of the special magic uuids for f57c638d-de27-4906-89af-ba02123007d0 i"),
    "niah_multivalue": (512, 384, ["3357020", "6186898", "6226014", "4609248"], "3431e388595e1c24",
        "Some special magic numbers are hidden within the following text. Make sure to memorize it. I will quiz "
        "you about the numbers afterwards.\nWhen I was a kid I thought the most important thing about a pro"),
    "niah_multiquery": (512, 372, ["3744719", "8237288", "8743915", "2235062"], "03a2f18cfa08334d",
        "Some special magic numbers are hidden within the following text. Make sure to memorize it. I will quiz "
        "you about the numbers afterwards.\n One of the special magic numbers for boiling-stranger is: 8237"),
    "vt": (1024, 993, ["TLYYE", "INHVK", "VWJSP", "UGHQP", "SRPRR"], "0ed665eafd43349b",
        "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\nVAR SPY = 96554\n"
        "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\nThe gras"),
    "cwe": (1024, 837,
        ["spud", "lining", "freight", "edger", "sow", "capable", "standardization", "shack", "aware", "freeze"],
        "3c6753a08a8272fd",
        "Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones "
        "that appear most often.\n1. gaudy 2. jog 3. intend 4. grid 5. attic 6. gamma-ray 7. cash 8. derb"),
    "fwe": (512, 437, ["vbgoul", "vyvviw", "sfywmh"], "e7c7513eb6880526",
        "Read the following coded text and track the frequency of each coded word. Find the three most frequently "
        "appeared coded words. yuhwhu ... ... ... ... vbgoul vyvviw ... sfywmh vbgoul ... vbgoul jcskbk "),
    "passkey": (512, 477, ["46751"], "97fc3334be2564ca",
        "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. I will "
        "quiz you about the important information there.\nThe grass is green. The sky is blue. The sun is yel"),
}  # fmt: skip


def _gen(task, tok, length, n=1, **kw):
    return rt.generate_samples(task, tok, length, n, haystack_text=kw.pop("haystack_text", None), **kw)


def test_test_tokenizer_is_stable(tok):
    """The pinned samples below depend on this exact tokenizer (and wonderwords' word lists)."""
    assert hashlib.sha256(tok.backend_tokenizer.to_str().encode()).hexdigest()[:16] == "46a1b3178df1ae18"
    assert rt.wonderwords_version() == "3.0.1", "pinned samples were generated with wonderwords 3.0.1"


@pytest.mark.parametrize("task", list(EXPECTED))
def test_pinned_sample(task, tok, essay):
    length, prompt_tokens, outputs, digest, head = EXPECTED[task]
    sample = rt.generate_sample(task, tok, length, 0, seed=42, haystack_text=essay)
    assert sample.prompt[:200] == head
    assert list(sample.outputs) == outputs
    assert sample.prompt_tokens == prompt_tokens
    assert hashlib.sha256(sample.input_text.encode()).hexdigest()[:16] == digest


def test_task_table_matches_ruler():
    assert set(rt.TASKS) == {
        "niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
        "niah_multikey_3", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe", "passkey",
    }  # fmt: skip
    ttg = {name: spec.tokens_to_generate for name, spec in rt.TASKS.items()}
    assert {ttg[n] for n in rt.TASKS if n.startswith("niah")} == {128}
    assert (ttg["vt"], ttg["cwe"], ttg["fwe"]) == (30, 120, 50)
    assert all(spec.metric == "string_match_all" for spec in rt.TASKS.values())
    a = {n: s.args for n, s in rt.TASKS.items()}
    assert (a["niah_single_1"].type_haystack, a["niah_single_2"].type_haystack) == ("noise", "essay")
    assert a["niah_single_3"].type_needle_v == "uuids"
    assert a["niah_multikey_1"].num_needle_k == 4 and a["niah_multikey_1"].type_haystack == "essay"
    assert a["niah_multikey_2"].type_haystack == "needle" and a["niah_multikey_2"].type_needle_k == "words"
    assert (a["niah_multikey_3"].type_needle_k, a["niah_multikey_3"].type_needle_v) == ("uuids", "uuids")
    assert a["niah_multivalue"].num_needle_v == 4 and a["niah_multiquery"].num_needle_q == 4
    assert (a["vt"].num_chains, a["vt"].num_hops, a["vt"].type_haystack) == (1, 4, "noise")
    assert (a["cwe"].freq_cw, a["cwe"].freq_ucw, a["cwe"].num_cw) == (30, 3, 10)
    assert a["fwe"].alpha == 2.0
    assert rt.RULER_METRICS["qa"] == "string_match_part"


def test_depths_match_numpy_linspace():
    assert rt.DEPTHS == (0, 3, 5, 8, 10, 13, 15, 18, 21, 23, 26, 28, 31, 33, 36, 38, 41, 44, 46, 49,
                         51, 54, 56, 59, 62, 64, 67, 69, 72, 74, 77, 79, 82, 85, 87, 90, 92, 95, 97, 100)  # fmt: skip


def test_riemann_zeta():
    assert rt.riemann_zeta(2.0) == pytest.approx(math.pi**2 / 6, rel=1e-15)
    assert rt.riemann_zeta(3.0) == pytest.approx(1.2020569031595942, rel=1e-15)
    assert rt.riemann_zeta(1.5) == pytest.approx(2.612375348685488, rel=1e-14)
    with pytest.raises(ValueError):
        rt.riemann_zeta(1.0)


def test_niah_word_pairs_are_collision_free():
    """Justifies drawing (adj, noun) indices instead of choosing from RULER's sorted unique pair list."""
    adjs, nouns = rt._niah_key_parts()
    adj_set, noun_set = set(adjs), set(nouns)
    for adj in (a for a in adjs if "-" in a):
        parts = adj.split("-")
        for i in range(1, len(parts)):
            head, tail = "-".join(parts[:i]), "-".join(parts[i:])
            if head in adj_set:
                assert not any(n.startswith(tail + "-") and n[len(tail) + 1 :] in noun_set for n in nouns)


# ---------------------------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("task", ["niah_single_1", "niah_multikey_3", "vt", "cwe", "fwe", "passkey"])
def test_determinism_and_index_independence(task, tok):
    length = 1024
    first = _gen(task, tok, length, 4, seed=7)
    again = _gen(task, tok, length, 4, seed=7)
    assert first == again
    assert rt.generate_sample(task, tok, length, 2, seed=7) == first[2]
    assert _gen(task, tok, length, 2, seed=7, start_index=2) == first[2:]
    assert len({s.input_text for s in first}) == 4, "samples of one run must differ"
    other_seed = _gen(task, tok, length, 1, seed=8)[0]
    assert other_seed.input_text != first[0].input_text


def test_essay_tasks_need_haystack(tok, essay):
    with pytest.raises(ValueError, match="haystack_text"):
        _gen("niah_single_2", tok, 1024)
    spec = rt.get_task("niah_single_2").with_args(type_haystack="noise")
    sample = rt.generate_samples(spec, tok, 1024, 1)[0]
    assert rt.NOISE_HAYSTACK in sample.prompt
    with pytest.raises(KeyError, match="known"):
        rt.get_task("qa_1")


# -------------------------------------------------------------------------------------------- length fitting


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("task", list(rt.TASKS))
def test_length_fitting(task, length, tok, essay):
    count = rt._token_counter(tok)
    if (task, length) in INFEASIBLE:
        with pytest.raises(ValueError, match="cannot fit|no sample fits"):
            _gen(task, tok, length, 1, haystack_text=essay)
        return
    samples = _gen(task, tok, length, 3, haystack_text=essay)
    for s in samples:
        assert s.prompt_tokens == count(s.input_text)
        assert s.prompt_tokens + s.max_new_tokens <= length
        assert s.metadata["ruler_length"] == s.prompt_tokens + s.max_new_tokens
        assert s.max_new_tokens == rt.TASKS[task].tokens_to_generate
        assert s.length == length and s.outputs


def test_most_samples_fill_the_length(tok, essay):
    """The size search lands close to the budget once RULER's coarse shrink step is made fine."""
    for task in ("niah_single_1", "niah_single_2", "passkey", "vt", "cwe"):
        for s in _gen(task, tok, 4096, 3, haystack_text=essay, shrink_step=1):
            assert s.prompt_tokens + s.max_new_tokens > 0.95 * 4096, task


def test_shrink_step_keeps_samples_near_the_length(tok, essay):
    coarse = _gen("niah_single_3", tok, 1024, 6, haystack_text=essay)
    fine = _gen("niah_single_3", tok, 1024, 6, haystack_text=essay, shrink_step=1)
    assert min(s.prompt_tokens for s in coarse) < 0.5 * (1024 - 128), "RULER's 500-word step (expected here)"
    assert min(s.prompt_tokens for s in fine) > 0.95 * (1024 - 128)
    assert all(s.prompt_tokens + 128 <= 1024 for s in fine)


def test_reserve_tokens(tok):
    for s in _gen("passkey", tok, 512, 3, reserve_tokens=7):
        assert s.prompt_tokens + s.max_new_tokens + 7 <= 512


def test_remove_newline_tab(tok):
    s = _gen("niah_single_1", tok, 512, 1, remove_newline_tab=True)[0]
    assert "\n" not in s.input_text and "  " not in s.input_text
    assert s.answer_prefix.startswith(" The special magic number")


def test_model_template_goes_before_answer_prefix(tok):
    s = _gen("niah_single_1", tok, 512, 1, model_template="[INST] {task_template} [/INST]")[0]
    assert s.prompt.startswith("[INST] A special magic number") and s.prompt.endswith(" [/INST]")
    assert s.answer_prefix.startswith(" The special magic number for ")


# ------------------------------------------------------------------------------------------------- structure


def test_niah_single_noise_structure(tok):
    s = _gen("niah_single_1", tok, 1024, 1)[0]
    (value,) = s.outputs
    key = s.metadata["query"]
    assert re.fullmatch(r"\d{7}", value)
    adjs, nouns = rt._niah_key_parts()
    adj, noun = next((a, key[len(a) + 1 :]) for a in adjs if key.startswith(a + "-") and key[len(a) + 1 :] in nouns)
    assert adj in adjs and noun in nouns
    assert f"One of the special magic numbers for {key} is: {value}." in s.prompt
    lines = s.prompt.split("\n")
    assert lines.count(rt.NOISE_HAYSTACK) == s.metadata["haystack_size"]
    assert s.prompt.endswith(f"\nWhat is the special magic number for {key} mentioned in the provided text?")
    assert s.answer_prefix == f" The special magic number for {key} mentioned in the provided text is"
    assert s.prompt.find(value) >= 0 and s.metadata["token_position_answer"] > 0


def test_niah_multikey_and_multiquery(tok, essay):
    mk1 = _gen("niah_multikey_1", tok, 2048, 1, haystack_text=essay)[0]
    needles = re.findall(r"One of the special magic numbers for (\S+) is: (\d{7})\.", mk1.prompt)
    assert len(needles) == 4 and len({k for k, _ in needles}) == 4
    assert (mk1.metadata["query"], mk1.outputs[0]) in needles
    mk2 = _gen("niah_multikey_2", tok, 2048, 1)[0]
    assert len(re.findall(r"One of the special magic numbers for", mk2.prompt)) == mk2.metadata["haystack_size"] + 1
    mk3 = _gen("niah_multikey_3", tok, 2048, 1)[0]
    uuid_re = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
    assert re.fullmatch(uuid_re, mk3.outputs[0]) and re.fullmatch(uuid_re, mk3.metadata["query"])
    assert f"for {mk3.metadata['query']} is: {mk3.outputs[0]}." in mk3.prompt
    mq = _gen("niah_multiquery", tok, 2048, 1, haystack_text=essay)[0]
    keys = re.findall(r"One of the special magic numbers for (\S+) is: (\d{7})\.", mq.prompt)
    assert [v for _, v in keys] and sorted(v for _, v in keys) == sorted(mq.outputs)
    assert (
        mq.prompt.endswith("mentioned in the provided text?")
        and "What are all the special magic numbers for" in mq.prompt
    )
    assert ", and " in mq.metadata["query"] and mq.answer_prefix.endswith("mentioned in the provided text are")


def test_niah_multivalue(tok, essay):
    s = _gen("niah_multivalue", tok, 2048, 1, haystack_text=essay)[0]
    key = s.metadata["query"]
    found = re.findall(rf"One of the special magic numbers for {re.escape(key)} is: (\d{{7}})\.", s.prompt)
    assert sorted(found) == sorted(s.outputs) and len(s.outputs) == 4
    assert s.prompt.startswith("Some special magic numbers are hidden")


def test_vt_chain_resolves_to_outputs(tok):
    s = _gen("vt", tok, 2048, 1)[0]
    main = s.prompt[s.prompt.rindex("Memorize and track") :]
    assigned: dict[str, str] = {}
    for lhs, rhs in re.findall(r"VAR ([A-Z]+) = (VAR [A-Z]+|\d+)", main):
        assigned[lhs] = rhs
    value = s.metadata["value"]

    def resolve(name: str) -> str:
        rhs = assigned[name]
        return resolve(rhs[4:]) if rhs.startswith("VAR ") else rhs

    assert {name for name in assigned if resolve(name) == value} == set(s.outputs)
    assert all(re.fullmatch(r"[A-Z]{5}", v) for v in s.outputs) and len(s.outputs) == 5
    assert s.answer_prefix == (
        " Answer: According to the chain(s) of variable assignment in the text above, 5 variables are assigned "
        f"the value {value}, they are: "
    )
    # The one-shot example (3-letter names, randomised value) comes first, then the real task.
    example = s.prompt[: s.prompt.rindex("Memorize and track")]
    assert example.startswith("Memorize and track") and example.endswith("\n")
    assert len(re.findall(r"\bVAR [A-Z]{3}\b", example)) == 9 and "12345" not in example


def test_cwe_counts_and_one_shot(tok):
    for length, (cw, ucw) in ((1024, (6, 1)), (4096, (30, 3))):
        s = _gen("cwe", tok, length, 1)[0]
        parts = s.prompt.split("Question: What are the 10 most common words in the above list?")
        assert len(parts) == 3, "one-shot example + task"
        shot_list, shot_answer = parts[0], parts[1]
        assert shot_answer.startswith(rt.CWE_ANSWER_PREFIX + " 1. ")
        shot_counts = Counter(re.findall(r"\d+\. (\S+)", shot_list))
        assert sorted(set(shot_counts.values())) == ([1, 3] if length < 4096 else [3, 10])
        counts = Counter(re.findall(r"\d+\. (\S+)", parts[1].split("\n", 1)[1]))
        assert {w: counts[w] for w in s.outputs} == dict.fromkeys(s.outputs, cw)
        assert set(counts.values()) == {cw, ucw}
        assert len(counts) == s.metadata["num_words"]
        assert s.answer_prefix == rt.CWE_ANSWER_PREFIX


def test_fwe_answers_are_most_frequent(tok):
    s = _gen("fwe", tok, 2048, 1)[0]
    intro = "Find the three most frequently appeared coded words. "
    context = s.prompt[s.prompt.index(intro) + len(intro) : s.prompt.index("\nQuestion:")]
    counts = Counter(context.split())
    ranked = [w for w, _ in counts.most_common() if w != "..."]
    assert tuple(ranked[:3]) == s.outputs
    n = s.metadata["num_words"]
    assert counts["..."] == int(n * 1 / rt.riemann_zeta(2.0))
    assert counts[s.outputs[0]] == int(n * 2**-2.0 / rt.riemann_zeta(2.0))


def test_passkey_structure(tok):
    s = _gen("passkey", tok, 1024, 1)[0]
    (key,) = s.outputs
    assert re.fullmatch(r"[1-9]\d{4}", key)
    assert f"\nThe pass key is {key}. Remember it. {key} is the pass key.\n" in s.prompt
    assert s.prompt.endswith("\nWhat is the pass key?") and s.answer_prefix == " The pass key is"


def test_split_sentences():
    text = 'He said "stop." Then he left! Did he? (Yes.) Mr. Smith stayed. End'
    assert rt.split_sentences(text) == [
        'He said "stop."',
        "Then he left!",
        "Did he?",
        "(Yes.)",
        "Mr.",
        "Smith stayed.",
        "End",
    ]
    assert rt.split_sentences("  ") == []
    assert " ".join(rt.split_sentences("A b. C d.  E")) == "A b. C d. E"


def test_to_dict_uses_ruler_field_names(tok):
    d = _gen("passkey", tok, 256, 1)[0].to_dict()
    assert {"input", "outputs", "answer_prefix", "length", "index"} <= set(d)


def test_cwe_vocabulary_cap_warns_and_extra_words_lift_it():
    """A counter that makes words nearly free forces the search past wonderwords' ~8.2K words."""

    def cheap(text: str) -> int:
        return len(text) // 40

    with pytest.warns(UserWarning, match="capped"):
        capped = rt.generate_samples("cwe", cheap, 100_000, 1)[0]
    assert capped.metadata["num_words"] == len(rt._cwe_words(42))
    extra = [f"word{i}" for i in range(30_000)]
    with pytest.warns(UserWarning, match="capped at 30000"):  # still capped, but by the larger list
        lifted = rt.generate_samples("cwe", cheap, 100_000, 1, cwe_extra_words=extra)[0]
    assert lifted.metadata["num_words"] > capped.metadata["num_words"]
    assert lifted.prompt_tokens + lifted.max_new_tokens <= 100_000




def test_postprocess_pred_like_ruler():
    assert rt.postprocess_pred("  12345\n") == "12345"
    assert rt.postprocess_pred("a\tb\x00c\x1fd\re") == "a\nb\nc\nd\ne"
    assert rt.postprocess_pred("\x01\x02 x \x03") == "x"
    assert rt.postprocess_pred("") == ""
    assert rt.postprocess_pred("é ü \x7f") == "é ü \x7f", "only \\x00-\\x1f are replaced"


def test_string_match_all_fraction_and_case():
    assert rt.string_match_all(["The answers: FOO and bar"], [["foo", "Bar", "baz", "qux"]]) == 50.0
    assert rt.string_match_all(["x"], [["a", "b", "c"]]) == 0.0
    assert rt.string_match_all(["abc", "a"], [["a", "b", "c"], ["a", "b", "c"]]) == pytest.approx(66.67)
    assert rt.string_match_all(["b"], [["a", "b", "c"]]) == 33.33, "rounded to 2 decimals like RULER"


def test_string_match_part_any():
    assert rt.string_match_part(["paris, france"], [["Paris", "Lyon"]]) == 100.0
    assert rt.string_match_part(["rome", "lyon"], [["Paris"], ["Paris", "LYON"]]) == 50.0


def test_empty_prediction_scores_zero():
    assert rt.string_match_all([""], [["1234567"]]) == 0.0
    assert rt.string_match_part([""], [["1234567"]]) == 0.0
    assert rt.sample_score("", [""]) == 1.0, "an empty reference is a substring of anything (Python semantics)"


def test_partial_and_substring_matches():
    # Substring semantics, exactly like RULER: a reference inside a longer token still counts ...
    assert rt.sample_score("12345678", ["1234567"]) == 1.0
    # ... but a truncated prediction does not.
    assert rt.sample_score("123456", ["1234567"]) == 0.0
    assert rt.sample_score("var abcde", ["ABCDE", "FGHIJ"]) == 0.5


def test_duplicates():
    assert rt.sample_score("a", ["a", "a"]) == 1.0
    assert rt.sample_score("b", ["a", "b", "a"]) == pytest.approx(1 / 3)
    assert rt.sample_score("a a a a", ["a", "b"]) == 0.5, "repeating an answer does not add credit"
    assert rt.sample_score("b", ["a", "b", "a"], "string_match_part") == 1.0


def test_invalid_inputs():
    with pytest.raises(ValueError):
        rt.string_match_all([], [])
    with pytest.raises(ValueError):
        rt.string_match_all(["a"], [[]])
    with pytest.raises(ValueError):
        rt.string_match_part(["a", "b"], [["a"]])
    with pytest.raises(ValueError):
        rt.sample_score("a", ["a"], "exact")  # type: ignore[arg-type]


def _samples(tok):
    return rt.generate_samples("passkey", tok, 256, 3) + rt.generate_samples("niah_multikey_2", tok, 512, 2)


def test_evaluate_oracle_and_nulls(tok):
    samples = _samples(tok)
    seen: list[str] = []

    def oracle(sample: rt.RulerSample) -> str:
        seen.append(sample.input_text)
        return " " + " ".join(sample.outputs).upper() + ".\n"

    report = rt.evaluate(oracle, samples)
    assert seen == [s.input_text for s in samples]
    assert report.scores["passkey"][256].score == 100.0 and report.scores["passkey"][256].num_samples == 3
    assert report.scores["niah_multikey_2"][512].score == 100.0
    assert all(r.prediction == r.raw_prediction.strip() for r in report.results)

    empty = rt.evaluate(lambda s: "\n", samples)
    assert empty.scores["passkey"][256].score == 0.0 and empty.scores["passkey"][256].nulls == "3/3"


def test_evaluate_groups_by_length_and_averages(tok):
    samples = rt.generate_samples("passkey", tok, 256, 2) + rt.generate_samples("passkey", tok, 512, 2)
    first_only = {samples[0].input_text, samples[2].input_text}

    def half(sample: rt.RulerSample) -> str:
        return sample.outputs[0] if sample.input_text in first_only else "no idea"

    report = rt.evaluate(half, samples)
    assert set(report.scores["passkey"]) == {256, 512}
    assert report.scores["passkey"][256].score == 50.0 and report.average(512) == 50.0
    with pytest.raises(KeyError):
        report.average(1024)




@pytest.fixture(scope="module")
def tiny_model(tok):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tok), n_positions=1024, n_embd=32, n_layer=2, n_head=2,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    return GPT2LMHeadModel(config).eval()


class _Recorder:
    """Tokenizer proxy that records the texts it is asked to encode."""

    def __init__(self, tok: Any) -> None:
        self._tok = tok
        self.texts: list[str] = []

    def __call__(self, text: str, **kwargs: Any) -> Any:
        self.texts.append(text)
        return self._tok(text, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tok, name)


def test_hf_generate_fn_appends_prefix_and_is_greedy(tok, tiny_model):
    sample = rt.generate_samples("passkey", tok, 256, 1)[0]
    recorder = _Recorder(tok)
    generate = rt.make_hf_generate_fn(tiny_model, recorder)
    first = generate(sample)
    assert recorder.texts == [sample.prompt + sample.answer_prefix]
    assert isinstance(first, str)
    assert len(tok(first, add_special_tokens=False)["input_ids"]) <= sample.max_new_tokens + 2
    assert generate(sample) == first, "greedy decoding is deterministic"


def test_hf_stop_words(tok, tiny_model):
    sample = rt.generate_samples("passkey", tok, 256, 1)[0]
    full = rt.make_hf_generate_fn(tiny_model, tok)(sample)
    if not full.strip():
        pytest.skip("random model produced only whitespace")
    stop = full.strip()[0]
    cut = rt.make_hf_generate_fn(tiny_model, tok, stop=[stop])(sample)
    assert cut == full.split(stop)[0]


def test_evaluate_end_to_end_with_hf(tok, tiny_model):
    samples = rt.generate_samples("passkey", tok, 256, 2) + rt.generate_samples("fwe", tok, 256, 1)
    report = rt.evaluate(rt.make_hf_generate_fn(tiny_model, tok), samples)
    assert len(report.results) == 3
    assert 0.0 <= report.scores["passkey"][256].score <= 100.0
    assert report.scores["fwe"][256].metric == "string_match_all"
