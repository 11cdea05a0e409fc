"""upcycle.generate reproduces transformers' greedy generate exactly (dense and bank-sparse, float32) and honours
every generation option; `upcycle generate` streams the same text."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import upcycle
from upcycle import generation
from upcycle.kernels import cpu
from upcycle.testing import tiny_config

needs_cc = pytest.mark.skipif(cpu._compiler() is None, reason="no C compiler: the fused CPU kernel is not built")


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def model_of(arch: str, vocab_size: int = 256, seed: int = 0, **overrides) -> nn.Module:
    """A 2-layer float32 model with GQA whose greedy tokens depend on attention (std 0.2, norms not all ones)."""
    from transformers import AutoModelForCausalLM

    kw = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=256, max_position_embeddings=512,
              tie_word_embeddings=arch == "llama", initializer_range=0.2)
    if arch == "qwen3":
        kw["head_dim"] = 16
    if arch == "mistral":
        kw["sliding_window"] = None
    kw.update(overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def hf_greedy(model: nn.Module, ids: torch.Tensor, n: int, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                              pad_token_id=0, **kw)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral"])
@pytest.mark.parametrize(("batch", "prompt_len"), [(1, 1), (1, 9), (2, 17)])
def test_dense_greedy_matches_hf_generate(arch, batch, prompt_len):
    model = model_of(arch)
    ids = torch.randint(0, 256, (batch, prompt_len))
    got = upcycle.generate(model, ids, 20)
    assert got.dtype == torch.long
    assert torch.equal(got, hf_greedy(model, ids, 20))


@needs_cc
@pytest.mark.parametrize("predictor", ["shadow", "lowrank"])
@pytest.mark.parametrize(("arch", "prompt_len"), [("llama", 5), ("qwen2", 24), ("qwen3", 40)])
def test_bank_sparse_greedy_matches_hf_generate(arch, predictor, prompt_len):
    model = model_of(arch)
    config = upcycle.BankSparseConfig(bank_size=64, keep=16, predictor=predictor, predictor_budget=0.2)
    upcycle.convert(model, config, progress=False)
    calls = []
    from upcycle.recipes.bank_sparse import runtime

    real = runtime._run
    try:  # count the decode kernel calls: the sparse FFNs must run their fused kernel, not the reference
        runtime._run = lambda impl, *a: calls.append(impl) or real(impl, *a)
        ids = torch.randint(0, 256, (1, prompt_len))
        got = upcycle.generate(model, ids, 16)
    finally:
        runtime._run = real
    assert calls and set(calls) == {"fused"}
    assert torch.equal(got, hf_greedy(model, ids, 16))
    with upcycle.kernels.use_kernels("reference"):  # and the reference path, token for token
        assert torch.equal(upcycle.generate(model, ids, 16), hf_greedy(model, ids, 16))


def test_bfloat16_matches_hf():
    model = model_of("qwen2").to(torch.bfloat16)
    ids = torch.randint(0, 256, (1, 9))
    assert torch.equal(upcycle.generate(model, ids, 12), hf_greedy(model, ids, 12))


@pytest.mark.parametrize(("arch", "overrides"), [
    ("mistral", {"sliding_window": 8}),  # every layer windowed
    ("qwen2", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}),  # layer 1 only
])
def test_sliding_window_matches_hf(arch, overrides):
    model = model_of(arch, **overrides)
    assert any(layer.window == 8 for layer in generation.Decoder(model, 1, 8).layers)
    for prompt_len in (3, 12):  # prefill shorter and longer than the window
        ids = torch.randint(0, 256, (2, prompt_len))
        assert torch.equal(upcycle.generate(model, ids, 16), hf_greedy(model, ids, 16))


def test_fast_norm_and_linear_are_bit_identical():
    model = model_of("qwen2")  # q/k/v have biases: exercises addmv
    layer = model.model.layers[0]
    for _ in range(10):
        x = torch.randn(1, 1, 64) * 3
        assert generation._norm(layer.input_layernorm, x).equal(layer.input_layernorm(x))
        for proj in (layer.self_attn.q_proj, layer.self_attn.v_proj, layer.self_attn.o_proj):
            assert generation._linear(proj, x).equal(proj(x))


def test_fixed_shape_step_matches_eager_step():
    """The step torch.compile captures (tensor position, whole cache under a mask) equals the eager step."""
    model = model_of("mistral", sliding_window=8)
    ids = torch.randint(0, 256, (2, 6))
    with torch.no_grad():
        eager, static = generation.Decoder(model, 2, 64), generation.Decoder(model, 2, 64)
        le, ls = eager.forward(ids, 0), static.forward(ids, 0)
        for p in range(6, 20):  # crosses the window
            tok = le.argmax(-1, keepdim=True)
            le, ls = eager.forward(tok, p), static.forward(tok, torch.tensor([p]))
            torch.testing.assert_close(ls, le, rtol=1e-5, atol=1e-5)


class CountingMLP(nn.Module):
    def __init__(self, inner: nn.Module, scale: float = 1.0) -> None:
        super().__init__()
        self.inner, self.scale, self.calls = inner, scale, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.inner(x) * self.scale


def test_mlp_modules_are_called_as_is_and_swaps_are_seen():
    model = model_of("llama")
    ids = torch.randint(0, 256, (1, 5))
    before = upcycle.generate(model, ids, 10)
    first = generation.get_decoder(model, 1, 15)
    assert upcycle.generate(model, ids, 10) is not None and generation.get_decoder(model, 1, 15) is first
    for layer in model.model.layers:
        layer.mlp = CountingMLP(layer.mlp, scale=300.0)
    after = upcycle.generate(model, ids, 10)  # the cached decoder notices the new modules
    assert [layer.mlp.calls for layer in model.model.layers] == [10, 10]  # 1 prefill + 9 decode steps
    assert torch.equal(after, hf_greedy(model, ids, 10)) and not torch.equal(after, before)
    long_ids = torch.randint(0, 256, (1, 300))  # more than 256 slots: a new, bigger decoder
    assert torch.equal(upcycle.generate(model, long_ids, 3), hf_greedy(model, long_ids, 3))
    assert generation.get_decoder(model, 1, 303).max_seq_len == 512


def test_eos_stops_and_pads_like_hf():
    model = model_of("llama")
    ids = torch.randint(0, 256, (2, 5))
    free = upcycle.generate(model, ids, 20, eos_token_id=[])[:, 5:]
    j = next(j for j in range(2, 20) if free[0, j] not in free[0, :j])
    eos = int(free[0, j])
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = 7
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False)
    got = upcycle.generate(model, ids, 20)
    assert torch.equal(got, expected)
    assert got[0, 5 + j] == eos and (got[0, 5 + j + 1:] == 7).all()
    assert torch.equal(upcycle.generate(model, ids[:1], 20), expected[:1, : 5 + j + 1])  # batch 1 stops early


def test_stream_max_tokens_and_1d_input():
    model = model_of("qwen2")
    ids = torch.randint(0, 256, (2, 4))
    seen: list[torch.Tensor] = []
    out = upcycle.generate(model, ids, 9, stream=seen.append)
    assert len(seen) == 9 and torch.equal(torch.stack(seen, dim=1), out[:, 4:])
    one = torch.randint(0, 256, (7,))
    assert upcycle.generate(model, one, 0).shape == (1, 7)
    assert torch.equal(upcycle.generate(model, one, 5), hf_greedy(model, one[None], 5))


def test_stop_strings_and_text_stream(tokenizer):
    model = model_of("llama", vocab_size=len(tokenizer))
    ids = torch.tensor([tokenizer.encode("def main(")])
    n = ids.shape[1]
    new = upcycle.generate(model, ids, 30, eos_token_id=[])[0, n:].tolist()
    text_at = [tokenizer.decode(new[:i]) for i in range(31)]
    cut = next(i for i in range(6, 31) if len(text_at[i]) >= 2 and len(text_at[i]) > len(text_at[i - 1]))
    stop = text_at[cut][-2:]
    first = next(i for i in range(1, 31) if stop in text_at[i])
    got = upcycle.generate(model, ids, 30, stop_strings=["never-appears", stop], tokenizer=tokenizer, eos_token_id=[])
    assert got[0, n:].tolist() == new[:first]
    with pytest.raises(ValueError, match="tokenizer"):
        upcycle.generate(model, ids, 3, stop_strings=["x"])
    pieces: list[str] = []
    stream = generation.TextStream(tokenizer, pieces.append)
    upcycle.generate(model, ids, 30, stream=stream, eos_token_id=[])
    stream.flush()
    assert "".join(pieces) == tokenizer.decode(new, skip_special_tokens=True)


def test_sampling_is_seeded_and_respects_filters():
    model = model_of("qwen3")
    ids = torch.randint(0, 256, (1, 4))
    a = upcycle.generate(model, ids, 16, temperature=1.0, seed=123)
    assert torch.equal(a, upcycle.generate(model, ids, 16, temperature=1.0, seed=123))
    assert not torch.equal(a, upcycle.generate(model, ids, 16, temperature=1.0, seed=124))
    greedy = upcycle.generate(model, ids, 16)
    assert torch.equal(upcycle.generate(model, ids, 16, temperature=0.7, top_k=1, seed=1), greedy)
    assert torch.equal(upcycle.generate(model, ids, 16, temperature=0.7, top_p=1e-6, seed=1), greedy)


def test_sample_top_k_top_p_sets_and_frequencies():
    gen = torch.Generator().manual_seed(0)
    probs = torch.tensor([0.5, 0.3, 0.1, 0.06, 0.04])
    logits = probs.log().repeat(4000, 1)
    top_k = generation._sample(logits, 1.0, 2, None, gen)
    assert set(top_k.tolist()) == {0, 1} and abs((top_k == 0).float().mean().item() - 0.5 / 0.8) < 0.03
    assert set(generation._sample(logits, 1.0, None, 0.85, gen).tolist()) == {0, 1, 2}
    assert set(generation._sample(logits, 1.0, 4, 0.75, gen).tolist()) == {0, 1}
    free = generation._sample(logits, 1.0, None, None, gen)
    assert abs((free == 4).float().mean().item() - 0.04) < 0.015
    assert generation._sample(logits[:3], 0.0, 2, 0.5, gen).tolist() == [0, 0, 0]


def test_unsupported_models_are_refused():
    model = model_of("llama")
    model.config.model_type = "granite"  # same module names, different maths
    with pytest.raises(ValueError, match="model types"):
        upcycle.generate(model, torch.tensor([[1, 2]]), 2)
    model = model_of("llama", rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    with pytest.raises(ValueError, match="dynamic"):
        upcycle.generate(model, torch.tensor([[1, 2]]), 2)
    with pytest.raises(ValueError, match="input_ids"):
        upcycle.generate(model_of("llama"), torch.zeros(1, 0, dtype=torch.long), 2)


@pytest.mark.skipif(not __import__("os").environ.get("UPCYCLE_SLOW_TESTS"),
                    reason="compiles (~30 s on 2 cores); set UPCYCLE_SLOW_TESTS=1")
@needs_cc
def test_compiled_step_keeps_sparse_kernel_and_tokens():
    model = model_of("llama")
    upcycle.convert(model, upcycle.BankSparseConfig(bank_size=64, keep=16, predictor="lowrank"), progress=False)
    ids = torch.randint(0, 256, (1, 6))
    assert torch.equal(upcycle.generate(model, ids, 12, compile=True), upcycle.generate(model, ids, 12))


def test_cli_streams_the_generated_text(sparse_dir, capsys):
    from upcycle.cli import main
    from upcycle.data.tokenizer import load_tokenizer

    assert main(["generate", "--model", str(sparse_dir), "--prompt", "import os\n", "--max-new-tokens", "12"]) == 0
    out, err = capsys.readouterr()
    tok = load_tokenizer(sparse_dir)
    model = upcycle.load(sparse_dir)
    ids = tok("import os\n", return_tensors="pt").input_ids
    expected = upcycle.generate(model, ids, 12)[0, ids.shape[1]:]
    assert out == tok.decode(expected, skip_special_tokens=True) + "\n"
    assert "tokens/s" in err
    assert main(["generate", "--model", str(sparse_dir), "--prompt", "x", "--top-p", "2"]) == 2
