"""Layer repair on tiny bank-sparse models: the diagnosis (screen, sweep, recovered, verdict, heatmap) with a
stand-in generator whose answers depend on which layer is dense, and the three repairs."""

from __future__ import annotations

import copy

import pytest
import torch

import upcycle
from upcycle.eval import tasks
from upcycle.kernels import cpu
from upcycle.recipes.bank_sparse import runtime, sparse_ffns
from upcycle.recipes.layer_repair import diagnose as D
from upcycle.recipes.layer_repair import repair as R
from upcycle.testing import tiny_model


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    pass


@pytest.fixture
def pair(tokenizer):
    dense = tiny_model("qwen2", vocab_size=len(tokenizer))
    sparse = upcycle.convert(copy.deepcopy(dense), upcycle.BankSparseConfig(bank_size=64, keep=16), progress=False)
    return sparse.eval(), dense.eval()


def layer_local_failure(layer: int = 1, from_length: int = 400, need_keep: int = 64):
    """A generate_fn factory standing in for greedy decoding: it runs the prefill (so the screen sees it) and
    answers right unless the model is sparse at `layer` (keep < need_keep) and the sample is long."""

    def factory(model, tokenizer):
        def gen(sample):
            with torch.no_grad():
                model(tokenizer(sample.input_text, return_tensors="pt")["input_ids"])
            keeps = {m.layer_idx: m.keep for _, m in sparse_ffns(model)}
            ok = not keeps or keeps.get(layer, need_keep) >= need_keep or sample.length < from_length
            return " " + " ".join(sample.outputs) if ok else " no idea"

        return gen

    return factory


def test_helpers(pair):
    sparse, dense = pair
    assert D.ffn_density(sparse) == pytest.approx(0.25) and D.ffn_density(dense) == 1.0
    assert D.ffn_density(sparse, {1: 64}) == pytest.approx(0.625)
    with D.dense_layer(sparse, 1):
        assert D.sparse_layers(sparse)[1].keep == 64 and D.ffn_density(sparse) == pytest.approx(0.625)
    assert D.sparse_layers(sparse)[1].keep == 16
    assert D.buckets_for(700) == [(0, 1024)]  # fixed buckets: the same labels at every length
    assert D.buckets_for(5000) == [(0, 1024), (1024, 2048), (2048, 4096), (4096, 8192)]
    assert D.recovered(1.0, 0.2, 0.6) == pytest.approx(0.5) and D.recovered(1.0, 0.98, 1.0) is None
    with pytest.raises(ValueError, match="dense model, not a bank-sparse one"):
        D.sparse_layers(dense)
    with pytest.raises(ValueError, match="layer.*7 out of range.*0-1"):
        D.check_layers([0, 7], sparse)
    with pytest.raises(ValueError, match="is a bank-sparse model"):
        D.check_dense(sparse)


@pytest.mark.skipif(not cpu.fused_available(), reason="no C compiler: fused CPU kernel not built")
def test_the_screen_leaves_decode_on_the_fused_kernel(pair):
    """The diagnosis scores the sparse model with the screen's hooks on: its decode steps must run the same
    kernel as without them (a hook on an FFN linear used to switch them to the torch path, and greedy decoding
    then flipped near-ties: the diagnosis' sparse score differed from `upcycle eval`'s)."""
    sparse, _ = pair
    x = torch.randn(1, 1, sparse.config.hidden_size)  # one decode step
    with torch.no_grad():
        for _, m in sparse_ffns(sparse):
            plain = runtime.decode_forward(m, x)
            assert plain is not None
            with D.Screen(sparse, kl_positions=8):
                screened = runtime.decode_forward(m, x)
                assert screened is not None and torch.equal(m(x), plain)
            assert torch.equal(screened, plain)


def test_screen_statistics(pair, tokenizer):
    sparse, _ = pair
    ids = tokenizer(tasks.generate("passkey", tokenizer, 600)[0].input_text, return_tensors="pt")["input_ids"]
    with D.Screen(sparse, kl_positions=8) as screen, torch.no_grad():
        sparse(ids)
        sparse(ids[:, :1])  # a one-token forward (a decode step) is not screened
    s = screen.summary()["all"]
    assert set(s) == {"0", "1"}
    b = s["0"]["0-1024"]
    assert b["tokens"] == ids.shape[1]
    assert 0.25 <= b["mass_kept"] <= 1 and 0 <= b["recall"] <= 1 and b["rel_err"] > 0 and b["kl"] >= 0
    with D.dense_layer(sparse, 0), D.Screen(sparse, kl_positions=8) as screen, torch.no_grad():
        sparse(ids)
    b = screen.summary()["all"]["0"]["0-1024"]
    assert b["mass_kept"] == pytest.approx(1.0) and b["recall"] == 1.0 and b["rel_err"] < 1e-5 and b["kl"] < 1e-6


def test_diagnosis_finds_the_layer(pair, tokenizer, monkeypatch, tmp_path):
    sparse, dense = pair
    monkeypatch.setattr(tasks, "hf_generate_fn", layer_local_failure(layer=1, from_length=400))
    r = D.diagnose(sparse, dense, tokenizer, "passkey", [300, 500], samples=2, sweep=None, kl_positions=8)
    assert r["dense"]["300"]["score"] == r["dense"]["500"]["score"] == 1.0
    assert (r["sparse"]["300"]["score"], r["sparse"]["500"]["score"]) == (1.0, 0.0)
    assert r["layers"]["1"]["recovered"] == {"300": None, "500": 1.0}
    assert r["sweep_lengths"] == [500] and r["layers"]["1"]["scores"]["300"] is None  # nothing lost at 300
    assert r["layers"]["0"]["recovered"]["500"] == 0.0
    assert r["best_layer"] == 1 and r["best_layers"][0]["lengths"] == [500]
    assert "Layer 1" in r["verdict"] and "500" in r["verdict"] and "100%" in r["verdict"]
    assert set(r["screen"]) == {"0", "1"} and set(r["screen"]["0"]) == {"300", "500"}
    assert D.sparse_layers(sparse)[1].keep == 16  # the sweep restored every keep
    table = D.format_table(r)
    assert "layer 1 dense" in table and "recovered" in table and "verdict" in table
    assert D.heatmap(r, tmp_path / "h.png") and (tmp_path / "h.png").stat().st_size > 10_000

    one = D.diagnose(sparse, dense, tokenizer, "passkey", [300, 500], samples=1, sweep=1, kl_positions=4,
                     rank_by="mass_lost")
    assert len(one["swept"]) == 1 and len(one["cleared_by_screen"]) == 1
    assert one["swept"][0] == one["screen_ranking"][0]["layer"] and one["screen_ranking"][0]["over_lengths"] == [500]
    with pytest.raises(ValueError, match="--rank-by"):
        D.diagnose(sparse, dense, tokenizer, "passkey", [300], rank_by="vibes")


def test_no_gap_skips_the_sweep(pair, tokenizer, monkeypatch):
    sparse, dense = pair
    monkeypatch.setattr(tasks, "hf_generate_fn", layer_local_failure(from_length=10**6))
    r = D.diagnose(sparse, dense, tokenizer, "passkey", [300], samples=1, kl_positions=0)
    assert r["swept"] == [] and r["best_layer"] is None and "costs less than" in r["verdict"]


def test_repairs(pair, tokenizer, tmp_path):
    sparse, dense = pair
    r = R.repair(sparse, 1, "keep", 32)
    assert (r["keep_before"], r["keep_after"]) == (16, 32)
    assert r["ffn_density_increase"] == pytest.approx(0.125)
    r = R.repair(sparse, 0, "dense")
    assert r["keep_after"] == 64 and r["ffn_density_after"] == pytest.approx(0.75)
    upcycle.save(sparse, tmp_path / "m")
    back = upcycle.load(tmp_path / "m")
    assert {m.layer_idx: m.keep for _, m in sparse_ffns(back)} == {0: 64, 1: 32}
    assert [x["method"] for x in back.config.upcycle["repairs"]] == ["keep", "dense"]
    with pytest.raises(ValueError, match="must lie in"):
        R.repair(sparse, 1, "keep", 65)
    with pytest.raises(ValueError, match="out of range"):
        R.repair(sparse, 2, "dense")
    with pytest.raises(ValueError, match="needs the dense reference"):
        R.repair(sparse, 1, "refit")


def test_refit_reduces_the_layer_error(pair, tokenizer, corpus):
    sparse, dense = pair
    ids = tokenizer("\n".join(corpus[:5]), return_tensors="pt")["input_ids"][0, : 4 * 256].reshape(4, 256)
    x, y = R.capture(dense, 1, ids)
    assert x.shape == y.shape == (1024, 64)
    before = {n: p.clone() for n, p in sparse.named_parameters() if ".layers.0." in n}
    r = R.repair(sparse, 1, "refit", reference=dense, windows=ids, steps=40, lr=3e-3, batch_tokens=256)
    f = r["refit"]
    assert f["error_after"] < 0.8 * f["error_before"] and r["ffn_density_increase"] == 0
    assert all(torch.equal(p, before[n]) for n, p in sparse.named_parameters() if n in before)  # layer-local
    assert not any(p.requires_grad is False for p in sparse.parameters())  # flags restored
