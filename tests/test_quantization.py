"""upcycle.quantize: int8 / int4 linears (attention, LM head, dense and bank-sparse FFNs) against the float reference,
and whole-model greedy decode through upcycle.generate identical to transformers' generate on the same model."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import upcycle
from upcycle.kernels import cpu, use_kernels
from upcycle.kernels.cpu import features
from upcycle.quantization import Int4Linear, Int8Linear, quantize, quantize_rows

# the models and the HF reference of test_generation.py (tests are not importable modules here)
_spec = importlib.util.spec_from_file_location("_generation_tests", Path(__file__).with_name("test_generation.py"))
_gen = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_gen)
model_of, hf_greedy = _gen.model_of, _gen.hf_greedy

needs_cc = pytest.mark.skipif(cpu._compiler() is None, reason="no C compiler: the int8 CPU kernels are not built")


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("axis", ["out", "in"])
def test_quantize_rows_round_trip(axis):
    w = torch.randn(48, 80) * torch.linspace(0.1, 3, 80)  # columns of very different ranges
    q, s = quantize_rows(w, axis)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    deq = q.float() * (s[:, None] if axis == "out" else s[None, :])
    step = s.max().item()
    assert (deq - w).abs().max() <= step / 2 + 1e-6  # round to nearest: half a step at most
    assert _rel(deq, w) < 0.01


@needs_cc
@pytest.mark.parametrize("axis", ["out", "in"])
@pytest.mark.parametrize("bias", [False, True])
def test_int8_linear_paths_agree(axis, bias):
    lin = torch.nn.Linear(96, 200, bias=bias)
    m = Int8Linear.from_linear(lin, axis)
    deq = m.dequantize()
    for rows in (1, 5, 40):  # the C kernel, the kernel at several rows, the blocked dequantising matmul
        x = torch.randn(rows, 96)
        with torch.no_grad():
            y = m(x)
        ref = torch.nn.functional.linear(x, deq, None if lin.bias is None else lin.bias.detach())
        assert y.shape == (rows, 200) and _rel(y, ref) < 1e-4  # the kernel's x is int16 per group of 64
    assert _rel(m.weight, lin.weight.detach()) < 0.01
    with torch.no_grad():  # the output keeps the input's dtype
        assert m(torch.randn(2, 3, 96, dtype=torch.bfloat16)).dtype == torch.bfloat16


@needs_cc
@pytest.mark.parametrize("axis", ["out", "in"])
@pytest.mark.parametrize("bias", [False, True])
def test_int4_linear_paths_agree(axis, bias):
    lin = torch.nn.Linear(96, 192, bias=bias)
    m = Int4Linear.from_linear(lin, axis)
    assert m.codes.shape == ((192, 48) if axis == "out" else (96, 96))
    for rows in (1, 5, 40):  # the C kernel (axis out), the blocked dequantising matmul
        x = torch.randn(rows, 96)
        with torch.no_grad():
            y = m(x)
        ref = torch.nn.functional.linear(x, m.weight.float(), None if lin.bias is None else lin.bias.detach())
        kernel = axis == "out" and rows <= cpu.LINEAR_MAX_TOKENS  # its x is int8 per group of 32 (test_int4.py)
        assert y.shape == (rows, 192) and _rel(y, ref) < (0.02 if kernel else 1e-4)
    assert 0.01 < _rel(m.weight, lin.weight.detach()) < 0.12  # 4 bits: a few percent


@needs_cc
@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("kind", ["dense", "shadow", "lowrank"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_quantized_model_greedy_matches_hf_generate_and_reference(kind, arch, fmt):
    model = model_of(arch)
    if kind != "dense":
        upcycle.convert(model, upcycle.BankSparseConfig(bank_size=64, keep=16, predictor=kind, predictor_budget=0.2),
                        progress=False)
    ids = torch.randint(0, 256, (1, 7))
    with torch.no_grad():
        float_logits = model(ids).logits
    quantize(model, fmt)
    cls = Int8Linear if fmt == "int8" else Int4Linear
    layer = model.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, cls) and isinstance(model.lm_head, Int8Linear)  # int4: head int8
    assert isinstance(layer.mlp.gate_proj, cls)
    assert layer.mlp.down_proj.axis == ("out" if kind == "dense" else "in")
    assert quantize(model, fmt) is model  # a second call changes nothing
    features.DISPATCH.clear()
    got = upcycle.generate(model, ids, 16)
    assert features.DISPATCH["int8_linear"] == features.auto_path("int8")
    if fmt == "int4":
        assert features.DISPATCH["int4_linear"] == features.auto_path("int4")
    if kind != "dense":
        assert features.DISPATCH["bank_sparse.weights"] == ("i8" if fmt == "int8" else "int4")
    assert torch.equal(got, hf_greedy(model, ids, 16))
    with use_kernels("reference"):
        assert torch.equal(upcycle.generate(model, ids, 16), got)
    if kind == "dense":  # the quantised model stays close to the float one (a sparse one flips near-tie channels);
        # int4 on a random 2-layer model: ~6% noise per weight compounds into ~0.35 (real-model quality: the held-out
        # ppl of bench/cpu_quality.py)
        with torch.no_grad():
            assert _rel(model(ids).logits, float_logits) < (0.05 if fmt == "int8" else 0.5)


@needs_cc
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantized_sparse_ffn_decode_matches_its_reference_path(fmt):
    model = model_of("llama")
    upcycle.convert(model, upcycle.BankSparseConfig(bank_size=64, keep=16, predictor="lowrank"), progress=False)
    quantize(model, fmt)
    mlp = model.model.layers[1].mlp
    for layout in ("split", "bundle"):
        for t in (1, 3):
            x = torch.randn(1, t, 64)
            with torch.no_grad(), use_kernels("auto", layout=layout):
                y = mlp(x)
            with torch.no_grad(), use_kernels("reference"):
                ref = mlp(x)
            assert _rel(y, ref) < 1e-4


@needs_cc
def test_bfloat16_model_quantizes():
    model = model_of("qwen2").to(torch.bfloat16)
    upcycle.convert(model, upcycle.BankSparseConfig(bank_size=64, keep=16, predictor="lowrank"), progress=False)
    quantize(model)
    ids = torch.randint(0, 256, (1, 5))
    got = upcycle.generate(model, ids, 10)
    assert torch.equal(got, hf_greedy(model, ids, 10))


@needs_cc
def test_int4_lm_head_on_request():
    model = quantize(model_of("llama"), "int4", lm_head_format="int4")
    assert isinstance(model.lm_head, Int4Linear)
    ids = torch.randint(0, 256, (1, 5))
    assert torch.equal(upcycle.generate(model, ids, 6), hf_greedy(model, ids, 6))


def test_bad_format_is_refused():
    with pytest.raises(ValueError, match="int3.*'int8', 'int4'"):
        quantize(model_of("llama"), "int3")


@needs_cc
def test_quantized_decode_holds_torch_at_one_thread_and_restores_it(monkeypatch):
    model = quantize(model_of("qwen2"), "int4")
    ids = torch.randint(0, 256, (1, 5))
    from upcycle.kernels.cpu import int4

    seen = []
    real = int4.int4_linear
    monkeypatch.setattr(int4, "int4_linear", lambda *a, **k: (seen.append((torch.get_num_threads(),
                                                                           cpu._pool_threads)), real(*a, **k))[1])
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        got = upcycle.generate(model, ids, 6)
        assert torch.get_num_threads() == 2  # the caller's count is back
        assert (1, 2) in seen  # decode steps: torch at 1, the kernel pool still allowed 2
        assert torch.equal(got, upcycle.generate(model, ids, 6, torch_threads=2))  # same tokens either way
    finally:
        torch.set_num_threads(before)
