import torch

from upcycle.recipes.bank_sparse.training import is_predictor_param
from upcycle.testing import tiny_model
from upcycle.train import TrainConfig
from upcycle.train.models import configure, ffn_parameter_names


def test_long_context_rope_settings_rebuild_the_rotary_embedding():
    model = tiny_model(vocab_size=512)
    before = model.get_decoder().rotary_emb.inv_freq.clone()
    cfg = TrainConfig(seq_len=8192, rope_theta=1e6, rope_scaling={"rope_type": "linear", "factor": 4.0},
                      max_position_embeddings=8192)
    configure(model, cfg)
    assert model.config.max_position_embeddings == 8192 and model.config.use_cache is False
    assert model.config.rope_parameters["rope_theta"] == 1e6
    after = model.get_decoder().rotary_emb.inv_freq
    # linear scaling divides the (new-base) frequencies by the factor
    base = 1.0 / (1e6 ** (torch.arange(0, before.numel() * 2, 2).float() / (before.numel() * 2)))
    assert torch.allclose(after, base / 4.0)
    assert model.config._attn_implementation == "sdpa"


def test_ffn_only_selection_and_predictor_groups():
    import upcycle

    model = upcycle.convert(tiny_model(vocab_size=512), upcycle.BankSparseConfig(keep=16), progress=False)
    names = ffn_parameter_names(model)
    assert names and all(".mlp." in n for n in names)
    assert any(is_predictor_param(n) for n in names) and not any("embed" in n or "norm" in n for n in names)
