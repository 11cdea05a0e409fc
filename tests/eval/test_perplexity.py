from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from upcycle.data import load_tokenizer, read_text
from upcycle.eval import perplexity as ppl_module
from upcycle.eval.perplexity import perplexity, windows
from upcycle.testing import tiny_model


@pytest.mark.parametrize("n,seq_len,stride", [(40, 16, 16), (40, 16, 8), (41, 16, 5), (17, 16, 16), (33, 16, 1)])
def test_windows_score_every_token_once(n, seq_len, stride):
    wins = windows(n, seq_len, stride)
    scored = [t for b, e, f in wins for t in range(f, e)]
    assert all(e - b <= seq_len and b < f for b, e, f in wins)
    if stride == seq_len:  # non-overlapping: the first token of every window has no context
        assert scored == [t for b, e, _ in wins for t in range(b + 1, e)]
    else:
        assert scored == list(range(1, n))


def test_windows_max_and_errors():
    assert len(windows(1000, 100, 100, max_windows=3)) == 3
    with pytest.raises(ValueError, match="stride"):
        windows(100, 10, 11)
    with pytest.raises(ValueError, match="seq_len"):
        windows(100, 1)


def test_single_window_ppl_is_exp_mean_nll():
    model = tiny_model("llama", vocab_size=97)
    ids = torch.randint(0, 97, (37,))
    logits = model(ids[None]).logits[0].float()
    by_hand = math.exp(F.cross_entropy(logits[:-1], ids[1:]).item())
    r = perplexity(model, ids, seq_len=64)
    assert r["tokens_scored"] == 36 and r["windows"] == 1
    assert r["ppl"] == pytest.approx(by_hand, rel=1e-5)


@pytest.mark.parametrize("stride,batch_size,chunk", [(16, 1, 1024), (16, 3, 5), (7, 2, 4)])
def test_windowed_ppl_matches_loop(stride, batch_size, chunk, monkeypatch):
    monkeypatch.setattr(ppl_module, "LOGIT_CHUNK", chunk)  # logits a few positions at a time
    model = tiny_model("qwen2", vocab_size=101)
    ids = torch.randint(0, 101, (75,))
    nll, count = 0.0, 0
    for b, e, f in windows(len(ids), 16, stride):
        logp = model(ids[None, b:e]).logits[0].float().log_softmax(-1)
        for t in range(f, e):
            nll -= logp[t - b - 1, ids[t]].item()
            count += 1
    r = perplexity(model, ids, seq_len=16, stride=stride, batch_size=batch_size)
    assert r["tokens_scored"] == count
    assert r["nll_mean"] == pytest.approx(nll / count, rel=1e-5)
    assert r["ppl"] == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_kl_to_reference(monkeypatch):
    monkeypatch.setattr(ppl_module, "LOGIT_CHUNK", 6)
    model, other = tiny_model("qwen2", vocab_size=64, seed=1), tiny_model("qwen2", vocab_size=64, seed=2)
    ids = torch.randint(0, 64, (20,))
    assert perplexity(model, ids, seq_len=32, reference=model)["kl_ref"] == pytest.approx(0.0, abs=1e-6)
    p_ref = other(ids[None]).logits[0, :-1].float().log_softmax(-1)
    p = model(ids[None]).logits[0, :-1].float().log_softmax(-1)
    by_hand = F.kl_div(p, p_ref, log_target=True, reduction="sum").item() / 19
    kl = perplexity(model, ids, seq_len=32, reference=other)["kl_ref"]
    assert kl > 0 and kl == pytest.approx(by_hand, rel=1e-4)


def test_read_text_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_text(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="no text"):
        read_text(tmp_path / "empty.txt")
    with pytest.raises(ValueError, match="directory"):
        read_text(tmp_path)


def test_missing_tokenizer_is_clear(tmp_path):
    tiny_model("qwen2", vocab_size=64).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="tokenizer"):
        load_tokenizer(tmp_path)


def test_held_out_scores_each_text_and_restores_the_mode(tokenizer, corpus):
    import upcycle
    from upcycle.data import tokenize
    from upcycle.eval.perplexity import HeldOut

    model = tiny_model("llama", vocab_size=512, intermediate_size=128).train()
    texts = {"in": corpus[0], "out": corpus[1]}
    held = HeldOut(tokenizer, texts, windows=2, seq_len=32, density=True)
    r = held(model)
    assert model.training  # evaluated in eval mode, handed back as it came
    for k, text in texts.items():  # the first `windows` windows of each text, nothing more
        assert r[k] == pytest.approx(perplexity(model.eval(), tokenize(tokenizer, text)[:64], seq_len=32)["ppl"])
    assert r["ffn_density"] == pytest.approx(1.0)
    upcycle.convert(model, upcycle.BankSparseConfig(bank_size=64, keep=16), progress=False)
    assert held(model)["ffn_density"] == pytest.approx(0.25, abs=1e-3)
    moe = upcycle.convert(tiny_model("llama", vocab_size=512, intermediate_size=128), upcycle.MoEUpcycleConfig(),
                          progress=False)
    assert held(moe)["ffn_density"] is None  # no SwiGLU FFN left to count channels of
    bf16 = HeldOut(tokenizer, texts, windows=2, seq_len=32, bf16=True)(model)
    assert set(bf16) == {"in", "out"} and bf16["in"] == pytest.approx(held(model)["in"], rel=0.05)
