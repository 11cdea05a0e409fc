"""MoEUpcycleConfig: every impossible setting is refused with the fix named; derived sizes; the JSON round trip."""

import pytest

from upcycle.recipes.moe import MoEUpcycleConfig


@pytest.mark.parametrize(
    ("kwargs", "fix"),
    [
        ({"num_experts": 4, "top_k": 5}, "set top_k <= num_experts"),
        ({"num_experts": 0}, "positive int"),
        ({"top_k": 0}, "positive int"),
        ({"init": "granular", "granularity": 1}, "granularity >= 2"),
        ({"init": "granular", "granularity": 4, "num_experts": 6}, "multiple of granularity - shared_experts = 4"),
        ({"init": "granular", "granularity": 2, "shared_experts": 2}, "granularity >= shared_experts + 1"),
        ({"init": "copy", "granularity": 2}, "set granularity=1"),
        ({"init": "copy", "shared_experts": 1}, "use init='granular'"),
        ({"init": "copy", "split_by": "cluster"}, "use split_by='contiguous'"),
        ({"shared_experts": -1, "init": "split"}, "int >= 0"),
        ({"router": "topk_softmax", "norm_topk_prob": False}, "set norm_topk_prob=True"),
        ({"init": "granular", "granularity": 4, "num_experts": 8, "top_k": 2, "router_init": "virtual_group"},
         "top_k to a multiple of 4"),
        ({"init": "split", "num_experts": 4, "top_k": 2, "router_init": "virtual_group"}, "use router_init='random'"),
        ({"router_init": "calibrate"}, "set drop_upcycle > 0"),
        ({"drop_upcycle": 1.0}, "[0, 1)"),
        ({"drop_upcycle": float("nan")}, "finite"),
        ({"router_jitter": -0.1}, "[0, 1)"),
        ({"layers": 0}, "use None for all layers"),
        ({"layers": [1, 1]}, "distinct"),
        ({"layers": True}, "must be None"),
        ({"aux_loss_coef": -1.0}, ">= 0"),
        ({"z_loss_coef": float("inf")}, "finite"),
        ({"init": "moefy"}, "is not one of"),
        ({"weight_scaling": "sqrt"}, "is not one of"),
        ({"router": "sinkhorn"}, "is not one of"),
        ({"expert_scale": 0.0}, "finite number > 0"),
    ],
)
def test_invalid_settings_name_the_fix(kwargs, fix):
    with pytest.raises(ValueError) as err:
        MoEUpcycleConfig(**kwargs)
    assert fix in str(err.value)


@pytest.mark.parametrize(
    ("kwargs", "g", "r", "c", "scale", "active"),
    [
        ({"num_experts": 8, "top_k": 2}, 1, 1, 8, 1.0, 2.0),
        ({"num_experts": 8, "top_k": 2, "norm_topk_prob": False}, 1, 1, 8, 4.0, 2.0),  # E / k
        ({"init": "granular", "granularity": 4, "num_experts": 8, "top_k": 4}, 4, 4, 2, 4.0, 1.0),
        # Megatron-Core: E_copies * G^2 / k = 2 * 16 / 4 = 8
        ({"init": "granular", "granularity": 4, "num_experts": 8, "top_k": 4, "norm_topk_prob": False}, 4, 4, 2, 8.0,
         1.0),
        ({"init": "granular", "granularity": 4, "shared_experts": 1, "num_experts": 6, "top_k": 3}, 4, 3, 2, 3.0, 1.0),
        ({"init": "split", "num_experts": 6, "shared_experts": 2, "top_k": 2}, 8, 6, 1, 6.0, 0.5),
        ({"init": "split", "num_experts": 16, "top_k": 4}, 16, 16, 1, 16.0, 0.25),  # unbiased for random routing
        ({"init": "split", "num_experts": 16, "top_k": 4, "expert_scale": 4}, 16, 16, 1, 4.0, 0.25),  # override
    ],
)
def test_derived_quantities(kwargs, g, r, c, scale, active):
    cfg = MoEUpcycleConfig(**kwargs)
    assert (cfg.slices_per_copy, cfg.experts_per_copy, cfg.num_copies) == (g, r, c)
    assert cfg.activation_scale() == pytest.approx(scale)
    assert cfg.expert_size(256) == 256 // g
    assert cfg.active_fraction() == pytest.approx(active)


def test_a_split_that_does_not_divide_d_ff_names_a_divisor():
    cfg = MoEUpcycleConfig(init="split", num_experts=5, top_k=1)
    with pytest.raises(ValueError, match=r"d_ff=256 is not divisible into 5 slices.*dividing 256 \(e.g. 4\)"):
        cfg.expert_size(256)
    with pytest.raises(ValueError, match="granularity dividing 96"):
        MoEUpcycleConfig(init="granular", granularity=5, num_experts=5, top_k=1).expert_size(96)


def test_layer_selection():
    assert MoEUpcycleConfig().moe_layer_indices(4) == [0, 1, 2, 3]
    assert MoEUpcycleConfig(layers=2).moe_layer_indices(6) == [1, 3, 5]  # Qwen2-MoE decoder_sparse_step rule
    assert MoEUpcycleConfig(layers=[3, 0]).moe_layer_indices(4) == [0, 3]
    with pytest.raises(ValueError, match=">= num_layers"):
        MoEUpcycleConfig(layers=[5]).moe_layer_indices(4)


def test_dict_round_trip_and_strict_json_values():
    cfg = MoEUpcycleConfig(init="granular", granularity=2, num_experts=4, top_k=2, layers=[0])
    assert MoEUpcycleConfig.from_dict(cfg.to_dict()) == cfg
    assert MoEUpcycleConfig.from_dict({**cfg.to_dict(), "from_a_newer_version": 1}) == cfg  # unknown keys ignored
    with pytest.raises(ValueError, match=r"x/config.json: top_k='2' is not int"):
        MoEUpcycleConfig.from_dict({"top_k": "2"}, where="x/config.json")
    with pytest.raises(ValueError, match="x/config.json: top_k=9 > num_experts=8"):
        MoEUpcycleConfig.from_dict({"top_k": 9}, where="x/config.json")
