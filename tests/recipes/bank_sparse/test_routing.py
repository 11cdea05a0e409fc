"""Activation checkpointing replays the forward's routing: the recomputed mask equals the original one."""

from __future__ import annotations

import contextlib

import pytest
import torch

import upcycle
from upcycle.recipes.bank_sparse import routing
from upcycle.recipes.bank_sparse.modules import sparse_ffns
from upcycle.testing import tiny_model
from upcycle.train.models import checkpoint_kwargs, enable_checkpointing


@pytest.mark.parametrize("n", [1, 7, 8, 64, 200])
def test_pack_bits_round_trip(n):
    mask = torch.rand(3, 5, n) > 0.5
    packed = routing.pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.shape == (15, (n + 7) // 8)
    assert torch.equal(routing.unpack_bits(packed, mask.shape), mask)


def _model(predictor: str):
    model = tiny_model("qwen2", vocab_size=128, hidden_size=64, intermediate_size=256, num_hidden_layers=2)
    extra = {"predictor_rank": 8} if predictor == "lowrank" else {"shadow_bits": 4}
    upcycle.convert(model, upcycle.BankSparseConfig(predictor=predictor, **extra), progress=False)
    model.config.use_cache = False
    return model.train()


def _noisy(model):
    """Scores that change on every call (a stand-in for a non-deterministic GEMM or a changed predictor)."""
    calls = {"n": 0}

    def perturb(mod, args, out):
        calls["n"] += 1
        return out + torch.randn(out.shape, generator=torch.Generator().manual_seed(calls["n"])) * out.std() * 3

    def noisy_shadow(shadow_weights):
        # the shadow's training path scores inside a fused kernel: perturb the weights it scores with
        def wrapped(*a, **k):
            calls["n"] += 1
            gen = torch.Generator().manual_seed(calls["n"])
            return tuple(w + torch.randn(w.shape, generator=gen) * w.std() * 3 for w in shadow_weights(*a, **k))
        return wrapped

    for _, m in sparse_ffns(model):
        if m.predictor.kind == "lowrank":
            m.predictor.in_proj.register_forward_hook(perturb)
        else:
            m.predictor.shadow_weights = noisy_shadow(m.predictor.shadow_weights)
    return calls


def _run(model, ids, replay: bool = True):
    """Masks seen at each down_proj in call order ((layer, mask) per call) and the non-predictor gradients."""
    seen = []
    hooks = [m.down_proj.register_forward_pre_hook(lambda mod, args, m=m: seen.append((m.layer_idx, args[0] != 0)))
             for _, m in sparse_ffns(model)]
    model.zero_grad(set_to_none=True)
    ctx = contextlib.nullcontext() if replay else _no_replay()
    with ctx:
        model(ids, labels=ids).loss.backward()
    for h in hooks:
        h.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None and "predictor" not in n}
    return seen, grads


@contextlib.contextmanager
def _no_replay():
    original = routing.replayed_mask
    routing.replayed_mask = lambda module: None
    try:
        yield
    finally:
        routing.replayed_mask = original


@pytest.mark.parametrize("predictor", ["shadow", "lowrank"])
def test_recomputed_mask_equals_the_forward_mask(predictor):
    torch.manual_seed(0)
    ids = torch.randint(0, 128, (2, 24))
    plain = _model(predictor)
    _noisy(plain)
    ref_masks, ref_grads = _run(plain, ids)  # no checkpointing: one forward, scores of call 1 and 2 (2 layers)

    ckpt = _model(predictor)
    ckpt.load_state_dict(plain.state_dict())
    assert "context_fn" in checkpoint_kwargs(ckpt)
    enable_checkpointing(ckpt)
    calls = _noisy(ckpt)
    masks, grads = _run(ckpt, ids)
    assert calls["n"] == 4  # forward + recomputation of both layers: the scores differed each time
    forward, recomputed = masks[:2], masks[2:]
    assert [layer for layer, _ in recomputed] == [1, 0]  # backward order
    for layer, mask in recomputed:
        assert torch.equal(mask, dict(forward)[layer]), f"layer {layer}: the recomputation used another mask"
    for (layer, mask), (ref_layer, ref) in zip(forward, ref_masks, strict=True):
        assert layer == ref_layer and torch.equal(mask, ref)
    if predictor == "lowrank":
        # a learned predictor's surrogate gradient (d loss / d x through the predictor) is computed from the
        # recomputed scores: what the mask decides is the same, what flows below the last FFN is not
        ref_grads = {n: g for n, g in ref_grads.items() if "layers.1.mlp." in n or n == "model.norm.weight"}
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-6, msg=name)

    # the test has teeth: recomputing the routing instead gives other masks and other gradients
    _noisy(ckpt)
    masks, grads = _run(ckpt, ids, replay=False)
    assert any(not torch.equal(m, dict(masks[:2])[layer]) for layer, m in masks[2:])
    assert any(not torch.allclose(grads[n], g, rtol=1e-5, atol=1e-6) for n, g in ref_grads.items())


def test_store_is_per_region_and_bit_packed():
    model = _model("shadow")
    enable_checkpointing(model)
    stores = []
    original = routing.checkpoint_context_fn

    def spy():
        fwd, rec = original()
        stores.append(fwd.store)
        return fwd, rec

    for _, m in sparse_ffns(model):
        type(m).checkpoint_context_fn = staticmethod(spy)
    try:
        enable_checkpointing(model)
        ids = torch.randint(0, 128, (1, 40))
        model(ids, labels=ids).loss.backward()
    finally:
        for _, m in sparse_ffns(model):
            type(m).checkpoint_context_fn = staticmethod(original)
    assert len(stores) == 2  # one checkpointed region per decoder layer
    for store in stores:
        assert (store.recorded, store.replayed) == (1, 1)
        assert all(not q for q in store.masks.values())  # consumed by the recomputation


def test_training_with_checkpointing_matches_without(tmp_path, sparse_dir, text_file, one_thread):
    """`upcycle train --gradient-checkpointing` (routing replayed) follows the same loss curve as without."""
    from upcycle.train import TrainConfig, train

    losses = {}
    for ckpt in (False, True):
        cfg = TrainConfig(model=str(sparse_dir), data=[str(text_file)], out=str(tmp_path / f"run{ckpt}"), seq_len=64,
                          batch_size=2, steps=3, lr=3e-3, eval_every=0, save_every=0, progress=False,
                          tensorboard=False, num_threads=1, val_max_sequences=2, gradient_checkpointing=ckpt)
        losses[ckpt] = list(train(cfg).losses.values())
    assert losses[True] == pytest.approx(losses[False], rel=1e-4, abs=1e-5)
