"""The memory planner (`upcycle train --plan`): exact parameter counts from a meta build, saved activations as
autograd really saves them, the arithmetic of sharding / checkpointing / lengths, the CLI."""

from __future__ import annotations

import json

import pytest
import torch

import upcycle
from upcycle.cli import main
from upcycle.testing import tiny_model
from upcycle.train import plan as P


def _saved_bytes(model, length: int) -> int:
    """Bytes of the non-parameter tensors autograd saves in a forward of `length` tokens (storages once)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    ids = torch.randint(0, 100, (1, length))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.get_decoder()(input_ids=ids, use_cache=False)
    return sum(seen.values())


def _tiny(arch: str, kind: str):
    m = tiny_model(arch, vocab_size=128, hidden_size=96, intermediate_size=384, num_hidden_layers=3,
                   num_attention_heads=6, num_key_value_heads=2)
    if kind == "lowrank":
        upcycle.convert(m, upcycle.BankSparseConfig(predictor="lowrank", predictor_rank=16), progress=False)
    elif kind == "shadow":
        upcycle.convert(m, upcycle.BankSparseConfig(predictor="shadow", shadow_bits=4), progress=False)
    m.set_attn_implementation("sdpa")
    m.config.use_cache = False
    return m.train()


@pytest.mark.parametrize("arch,kind", [("llama", "dense"), ("qwen2", "shadow"), ("qwen2", "lowrank"),
                                       ("qwen3", "dense")])
def test_saved_activations_match_autograd(arch, kind, one_thread):
    m = _tiny(arch, kind)
    per_token = (_saved_bytes(m, 512) - _saved_bytes(m, 256)) / 256  # the slope: per token, all layers
    d = P.dims_from_model(m)
    s = P.Setup(seq_len=512)
    est = P.layer_saved_per_token(d, s) * d.layers + P.globals_per_token(d, s, last_hidden=False)
    assert est == pytest.approx(per_token, rel=0.02), (est, per_token)


def test_dims_are_exact_parameter_counts(tmp_path):
    for arch, kind in (("llama", "dense"), ("qwen2", "lowrank")):
        m = _tiny(arch, kind)
        d = P.dims_from_model(m)
        assert d.params == sum(p.numel() for p in m.parameters())
        assert d.layers == 3 and d.hidden == 96 and d.ffn == 384 and d.kv_heads == 2
        routing = sum(p.numel() for n, p in m.named_parameters() if "predictor" in n)
        assert d.teacher_params == d.params - routing
        assert (d.sparse_layers, d.predictor) == ((3, "lowrank") if kind == "lowrank" else (0, None))
        upcycle.save(m, tmp_path / arch)
        meta = P.dims_from_model(P.meta_model(tmp_path / arch))  # config.json only, on the meta device
        assert (meta.params, meta.layer_params, meta.root_params, meta.rank) == (d.params, d.layer_params,
                                                                                 d.root_params, d.rank)


def _dims(**kw) -> P.Dims:
    base = dict(name="x", params=1_000_000, layer_params=200_000, root_params=200_000, teacher_params=1_000_000,
                layers=4, hidden=128, ffn=512, heads=4, kv_heads=2, head_dim=32, vocab=1000, max_positions=None)
    return P.Dims(**{**base, **kw})


def test_static_memory_and_sharding():
    d = _dims()
    p = P.plan(d, P.Setup(seq_len=128, teacher_bytes=None))
    b = p.breakdown
    assert b["weights"] == 4 * d.params and b["optimizer"] == 8 * d.params
    ev = p.events
    assert ev["optimizer step"] >= 16 * d.params  # weights + gradients + moments at the update
    assert P.plan(d, P.Setup(seq_len=128, teacher_bytes=2)).breakdown["teacher"] >= 2 * d.teacher_params
    sharded = P.plan(d, P.Setup(seq_len=128, world_size=8, device="cuda", bf16=True, teacher_bytes=2))
    assert sharded.breakdown["optimizer"] == 8 * d.params / 8
    assert sharded.breakdown["teacher"] >= 2 * d.teacher_params  # the teacher is not sharded
    assert sharded.peak_bytes < P.plan(d, P.Setup(seq_len=128, device="cuda", bf16=True, teacher_bytes=2)).peak_bytes


def test_checkpointing_is_flat_per_token_and_smaller():
    d = _dims(sparse_layers=4, predictor="lowrank", rank=16)
    on = [P.plan(d, P.Setup(seq_len=n, gradient_checkpointing=True, teacher_bytes=None)) for n in (2048, 16384)]
    off = P.plan(d, P.Setup(seq_len=16384, teacher_bytes=None))
    assert on[1].per_token_bytes == pytest.approx(on[0].per_token_bytes, rel=1e-9)
    assert on[1].breakdown["activations"] < off.breakdown["activations"] / 2
    assert on[1].peak_bytes > on[0].peak_bytes
    # the routing bits of every layer (d_ff / 8 bytes per token) are part of what checkpointing keeps
    dense = P.plan(_dims(), P.Setup(seq_len=16384, gradient_checkpointing=True, teacher_bytes=None))
    assert on[1].events["loss backward"] - dense.events["loss backward"] == pytest.approx(4 * 16384 * 512 / 8, rel=1e-6)


def test_fits_and_longest_sequence():
    d = _dims()
    s = P.Setup(seq_len=4096, gradient_checkpointing=True)
    p = P.plan(d, s)
    p.device_bytes = p.peak_bytes + 1
    assert p.fits
    p.device_bytes = p.peak_bytes - 1
    assert p.fits is False
    n = P.max_fitting_seq_len(d, s, 10 * p.peak_bytes)
    assert n is not None and n > 4096 and n % 1024 == 0
    assert P.plan(d, P.Setup(**{**s.__dict__, "seq_len": n})).peak_bytes <= 10 * p.peak_bytes
    with pytest.raises(ValueError, match="seq_len"):
        P.plan(d, P.Setup(seq_len=1))


def test_cli_plan(capsys, sparse_dir):
    argv = ["train", "--model", str(sparse_dir), "--seq-len", "1024", "--gradient-checkpointing", "--plan"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for word in ("weights", "gradients", "optimizer state", "activations", "logits", "teacher", "peak", "fits"):
        assert word in out, word
    gpu = ["--plan-json", "--plan-world-size", "8", "--plan-device", "cuda", "--plan-memory-gb", "80"]
    assert main(argv + gpu) == 0
    p = json.loads(capsys.readouterr().out)
    assert p["setup"]["world_size"] == 8 and p["setup"]["bf16"] and p["device_bytes"] == 80e9 and p["fits"]
    assert p["dims"]["sparse_layers"] == 2
    tiny = main(argv + ["--plan-memory-gb", "0.001"])
    assert tiny == 0 and "does NOT fit" in capsys.readouterr().out


@pytest.mark.parametrize("extra,message", [
    (["--plan-world-size", "0"], "--plan-world-size"),
    (["--seq-len", "0"], "seq_len"),
    (["--plan-memory-gb", "-1"], "--plan-memory-gb"),
])
def test_cli_plan_errors(capsys, sparse_dir, extra, message):
    assert main(["train", "--model", str(sparse_dir), "--plan", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_plan_needs_a_model(capsys, tmp_path):
    assert main(["train", "--model", str(tmp_path / "nothing"), "--plan"]) == 2
    assert "config.json" in capsys.readouterr().err


def test_no_quadratic_activation_on_cpu_sdpa(one_thread):
    """What autograd saves grows linearly with the length (SDPA's flash kernel on CPU, no [L, L] mask or scores):
    the bytes per extra token are the same from 256 to 512 and from 512 to 1024 tokens."""
    m = _tiny("llama", "shadow")
    a, b, c = (_saved_bytes(m, n) for n in (256, 512, 1024))
    assert (c - b) / 512 == pytest.approx((b - a) / 256, rel=0.01)
