"""N:M conversion: every method makes every target exactly N:M (one-shot) or leaves it for training, the mask is
the checkpoint's zeros and survives save/load bit for bit, plain transformers loads the same function, and the
literature's order SparseGPT <= Wanda <= magnitude holds on a model with uneven channel norms."""

from __future__ import annotations

import json

import pytest
import torch

import upcycle
from upcycle.recipes import registry
from upcycle.recipes.nm import exactness, is_nm
from upcycle.recipes.nm.convert import targets
from upcycle.testing import tiny_model

FFN = ("gate_proj", "up_proj", "down_proj")


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_one_shot_makes_every_target_exactly_nm_and_leaves_the_rest(arch, method, uneven, calib):
    model = uneven(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = upcycle.NMSparseConfig(method=method, targets=["ffn", "attention"] if method != "wanda" else ["ffn"])
    upcycle.convert(model, cfg, calibration_ids=calib(), progress=False)
    found = targets(model, cfg)
    assert len(found) == (14 if method != "wanda" else 6)
    for name, lin in found.items():
        assert is_nm(lin.weight, 2, 4), name
        assert (lin.weight != 0).float().mean() <= 0.5
    for k, v in model.state_dict().items():
        if not any(f"{t}.weight" in k for t in cfg.linear_names()):
            assert torch.equal(v, before[k]), k  # norms, embeddings, non-targets: bit-identical
    assert exactness(model)["exact"] and registry.for_model(model).name == "nm"


def test_other_patterns_and_layer_subsets(uneven, calib):
    model = uneven("qwen2")
    cfg = upcycle.NMSparseConfig(n=4, m=8, method="sparsegpt", targets=["down_proj"], layers=[1])
    upcycle.convert(model, cfg, calibration_ids=calib(), progress=False)
    assert list(targets(model, cfg)) == ["model.layers.1.mlp.down_proj"]
    assert is_nm(model.model.layers[1].mlp.down_proj.weight, 4, 8)
    assert not is_nm(model.model.layers[0].mlp.down_proj.weight, 4, 8)


def test_sparsegpt_beats_wanda_beats_magnitude_on_every_linear(uneven, calib):
    errors = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        model = uneven("llama")
        errors[method] = {}
        upcycle.convert(model, upcycle.NMSparseConfig(method=method, targets=["ffn", "attention"]),
                        calibration_ids=calib(16, 32), errors=errors[method], progress=False)
    assert len(errors["sparsegpt"]) == 14
    for name in errors["sparsegpt"]:
        assert errors["sparsegpt"][name] <= errors["wanda"][name] <= errors["magnitude"][name], name


def test_trained_methods_stay_dense_until_training():
    for method in ("cast", "srste"):
        model = tiny_model("qwen2", vocab_size=128)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        upcycle.convert(model, upcycle.NMSparseConfig(method=method))
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        assert model.config.upcycle["nm"]["pruned"] is False and not exactness(model)["exact"]


def test_exactness_survives_save_and_load_and_plain_transformers_loads_the_same_function(tmp_path, uneven, calib):
    from transformers import AutoModelForCausalLM

    model = uneven("llama")
    shared = model.config
    twin = tiny_model("llama", vocab_size=512)
    twin.config = shared  # a config object shared with another model must not be changed by converting
    upcycle.convert(model, upcycle.NMSparseConfig(method="sparsegpt"), calibration_ids=calib(), progress=False)
    assert not hasattr(shared, "upcycle") and hasattr(model.config, "upcycle")
    out = upcycle.save(model, tmp_path / "nm")
    saved = json.loads((out / "config.json").read_text())
    assert saved["model_type"] == "llama" and saved["architectures"] == ["LlamaForCausalLM"]  # not re-classed
    meta = saved["upcycle"]
    assert meta["recipe"] == "nm" and meta["nm"]["pruned"] is True and meta["nm"]["n"] == 2
    assert "exact zeros" in meta["nm"]["mask"]
    loaded = upcycle.load(out)
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(plain) is type(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]) and torch.equal(v, plain.state_dict()[k]), k
    assert exactness(loaded)["exact"]
    ids = calib(1, 12)
    with torch.no_grad(), upcycle.kernels.use_kernels("reference"):
        ref = model(ids).logits
        assert torch.equal(loaded(ids).logits, ref) and torch.equal(plain(ids).logits, ref)
    # the metadata round trip: the saved section rebuilds the same config
    cfg = registry.get("nm").config_from_section(meta["nm"])
    assert cfg == upcycle.NMSparseConfig(method="sparsegpt")
    assert upcycle.save(loaded, tmp_path / "again") and json.loads((tmp_path / "again" / "config.json").read_text())[
        "upcycle"] == meta


def test_bad_inputs_name_the_fix():
    with pytest.raises(ValueError, match="n=4 must be < m=4"):
        upcycle.NMSparseConfig(n=4, m=4)
    with pytest.raises(ValueError, match="n=3 must be < m=2"):
        upcycle.NMSparseConfig(n=3, m=2)
    with pytest.raises(ValueError, match="targets"):
        upcycle.NMSparseConfig(targets=["mlp"])
    with pytest.raises(ValueError, match="method="):
        upcycle.NMSparseConfig(method="random")
    with pytest.raises(ValueError, match=r"in_features=64, not divisible by m=3"):
        upcycle.convert(tiny_model("qwen2", vocab_size=64), upcycle.NMSparseConfig(n=1, m=3))
    for method in ("wanda", "sparsegpt"):
        with pytest.raises(ValueError, match=f"method '{method}' needs calibration data"):
            upcycle.convert(tiny_model("qwen2", vocab_size=64), upcycle.NMSparseConfig(method=method))
    model = upcycle.convert(tiny_model("qwen2", vocab_size=64), upcycle.NMSparseConfig())
    with pytest.raises(ValueError, match="already converted"):
        upcycle.convert(model, upcycle.NMSparseConfig())
    with pytest.raises(ValueError, match=r"layers \[5\] do not exist"):
        upcycle.convert(tiny_model("qwen2", vocab_size=64), upcycle.NMSparseConfig(layers=[5]))
    with pytest.raises(ValueError, match="config.json: n="):
        upcycle.NMSparseConfig.from_dict({"n": "2"}, where="config.json")
