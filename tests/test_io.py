import json

import pytest
import torch

import upcycle
from upcycle.recipes.bank_sparse.modules import sparse_ffns
from upcycle.testing import tiny_model


def _converted(arch="qwen2", **kw):
    model = tiny_model(arch, vocab_size=512, **kw)
    upcycle.convert(model, upcycle.BankSparseConfig(keep=16, keep_per_layer={1: 32}), progress=False)
    return model


@pytest.mark.parametrize("arch, tie", [("qwen2", False), ("llama", True)])
def test_save_load_bitwise_identical(tmp_path, arch, tie):
    model = _converted(arch, tie_word_embeddings=tie)
    next(m for _, m in sparse_ffns(model)).keep = 8  # a live keep change is saved too
    ids = torch.randint(0, 512, (2, 20))
    with torch.no_grad():
        want = model(ids).logits
    model.save_pretrained(tmp_path / "ck")
    loaded = upcycle.load(tmp_path / "ck")
    with torch.no_grad():
        got = loaded(ids).logits
    assert torch.equal(got, want)
    assert [m.keep for _, m in sparse_ffns(loaded)] == [8, 32]
    meta = json.loads((tmp_path / "ck" / "config.json").read_text())["upcycle"]
    assert meta["bank_sparse"]["bank_size"] == 64 and meta["recipe"] == "bank_sparse"


def test_dense_checkpoint_loads_as_dense(tmp_path):
    model = tiny_model(vocab_size=512)
    model.save_pretrained(tmp_path / "dense")
    loaded = upcycle.load(tmp_path / "dense")
    assert not list(sparse_ffns(loaded))
    ids = torch.randint(0, 512, (1, 8))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


class Boom(RuntimeError):
    pass


def test_interrupted_save_leaves_no_checkpoint(tmp_path, monkeypatch):
    from safetensors import torch as st

    model = _converted()
    real = st.save_file

    def half_write(tensors, filename, *a, **k):
        real(dict(list(tensors.items())[:2]), filename, *a, **k)
        raise Boom("killed mid-write")

    monkeypatch.setattr(st, "save_file", half_write)
    import transformers.modeling_utils as mu

    monkeypatch.setattr(mu, "safe_save_file", half_write, raising=False)
    with pytest.raises(Boom):
        model.save_pretrained(tmp_path / "ck")
    assert not (tmp_path / "ck").exists()
    assert list(tmp_path.iterdir()) == []  # the temp dir is cleaned up too


def test_interrupted_overwrite_keeps_old_checkpoint(tmp_path, monkeypatch):
    model = _converted()
    model.save_pretrained(tmp_path / "ck")
    before = (tmp_path / "ck" / "model.safetensors").read_bytes()
    import upcycle.fsutil as fsutil

    monkeypatch.setattr(fsutil, "_fsync_tree", lambda p: (_ for _ in ()).throw(Boom("power cut")))
    with pytest.raises(Boom):
        model.save_pretrained(tmp_path / "ck")
    assert (tmp_path / "ck" / "model.safetensors").read_bytes() == before
    upcycle.load(tmp_path / "ck")


def test_corrupt_and_mismatched_checkpoints_give_clear_errors(tmp_path):
    model = _converted()
    ck = tmp_path / "ck"
    model.save_pretrained(ck)
    weights = ck / "model.safetensors"
    data = weights.read_bytes()

    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(upcycle.CheckpointError, match="corrupt or truncated"):
        upcycle.load(ck)
    weights.write_bytes(b"\x00" * 64)
    with pytest.raises(upcycle.CheckpointError, match="corrupt or truncated"):
        upcycle.load(ck)
    weights.write_bytes(data)

    cfg = json.loads((ck / "config.json").read_text())
    upcycle_meta = cfg.pop("upcycle")
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(upcycle.CheckpointError, match=r"do not match config\.json.*predictor"):
        upcycle.load(ck)
    cfg["upcycle"] = upcycle_meta
    cfg["intermediate_size"] = 128
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(upcycle.CheckpointError, match=r"has shape .* different models"):
        upcycle.load(ck)
    (ck / "config.json").write_text("{not json")
    with pytest.raises(upcycle.CheckpointError, match="not valid JSON"):
        upcycle.load(ck)
    with pytest.raises(upcycle.CheckpointError, match="does not exist"):
        upcycle.load(tmp_path / "nowhere")
    (ck / "config.json").unlink()
    with pytest.raises(upcycle.CheckpointError, match="no config.json"):
        upcycle.load(ck)
