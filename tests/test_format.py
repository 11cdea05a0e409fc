"""The on-disk format: checkpoints written before the recipe registry still load, bit for bit, and the
converted-model classes round-trip through plain transformers."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import upcycle
from upcycle import format as fmt
from upcycle.recipes.bank_sparse.modules import sparse_ffns
from upcycle.testing import tiny_model

FIXTURES = Path(__file__).parent / "fixtures" / "format1"


@pytest.mark.parametrize("name", ["lowrank", "shadow"])
def test_checkpoints_of_the_previous_layout_load_with_identical_logits(name, tmp_path):
    expected = load_file(FIXTURES / f"{name}_expected.safetensors")
    model = upcycle.load(FIXTURES / name)
    with torch.no_grad():
        assert torch.equal(model(expected["ids"]).logits, expected["logits"])
    kinds = {m.predictor.kind for _, m in sparse_ffns(model)}
    assert kinds == {name}
    if name == "lowrank":
        assert [m.keep for _, m in sparse_ffns(model)] == [16, 32]
    # re-saved, it is written in today's layout and still loads to the same model
    model.save_pretrained(tmp_path / "again")
    again = upcycle.load(tmp_path / "again")
    with torch.no_grad():
        assert torch.equal(again(expected["ids"]).logits, expected["logits"])
    assert again.config.model_type == "upcycle_qwen2"


def test_plain_transformers_loads_the_converted_model_after_import_upcycle(tmp_path):
    from transformers import AutoModelForCausalLM

    model = upcycle.convert(tiny_model(vocab_size=128), upcycle.BankSparseConfig(keep=16), progress=False)
    model.save_pretrained(tmp_path / "ck")
    ids = torch.randint(0, 128, (1, 9))
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "ck").eval()
    assert type(plain).__name__ == "UpcycleQwen2ForCausalLM"
    assert len(list(sparse_ffns(plain))) == 2
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, model.eval()(ids).logits)
    # and the HF class round trip keeps it: save_pretrained of the loaded model, load again
    plain.save_pretrained(tmp_path / "ck2")
    with torch.no_grad():
        assert torch.equal(upcycle.load(tmp_path / "ck2")(ids).logits, plain(ids).logits)


def test_convert_leaves_a_shared_config_alone():
    from transformers import AutoModelForCausalLM

    from upcycle.testing import tiny_config

    cfg = tiny_config(vocab_size=128)
    a = AutoModelForCausalLM.from_config(cfg)
    upcycle.convert(a, progress=False)
    assert type(cfg).__name__ == "Qwen2Config" and not hasattr(cfg, fmt.KEY)
    b = AutoModelForCausalLM.from_config(cfg)
    assert type(b).__name__ == "Qwen2ForCausalLM"
    upcycle.to_dense(a)
    assert type(a).__name__ == "Qwen2ForCausalLM" and a.config.model_type == "qwen2"


@pytest.mark.parametrize("meta, match", [
    ([1, 2], "must be an object"),
    ({"format_version": 99, "recipe": "bank_sparse", "bank_sparse": {}}, "newer upcycle"),
    ({"format_version": "1", "recipe": "bank_sparse", "bank_sparse": {}}, "non-negative integer"),
    ({"format_version": 1, "recipe": 3}, "not a recipe name"),
    ({"format_version": 1, "recipe": "bank_sparse", "bank_sparse": "x"}, "must be an object"),
])
def test_envelope_errors(meta, match):
    with pytest.raises(fmt.FormatError, match=match):
        fmt.parse(meta, "x/config.json")


def test_envelope_round_trip():
    meta = fmt.parse(fmt.make("bank_sparse", {"keep": 16}, source="/p"))
    assert (meta.recipe, meta.section, meta.extra) == ("bank_sparse", {"keep": 16}, {"source": "/p"})
    assert fmt.parse(None) is None
