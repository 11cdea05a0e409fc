"""BankSparseConfig's calibration budget: a default scaled with the layer, explicit values, saved sections."""

import pytest

from upcycle.recipes.bank_sparse.config import BankSparseConfig, default_calibrate_steps
from upcycle.recipes.bank_sparse.convert import config_from_section


def test_default_calibrate_steps_grow_with_the_layer_up_to_the_tuned_300():
    assert default_calibrate_steps(64) == 50  # the floor: a tiny layer still gets a real fit
    assert default_calibrate_steps(256) == 64
    assert default_calibrate_steps(1536) == 300  # SmolLM2-135M
    assert default_calibrate_steps(4864) == 300  # Qwen2.5-0.5B: the steps the fit was tuned with


def test_an_explicit_calibrate_steps_wins():
    assert BankSparseConfig().calibrate_steps is None
    assert BankSparseConfig().calibrate_steps_for(256) == 64
    assert BankSparseConfig(calibrate_steps=7).calibrate_steps_for(4864) == 7
    assert BankSparseConfig(calibrate_steps=0).calibrate_steps_for(4864) == 0
    with pytest.raises(ValueError, match="calibrate_steps=-1"):
        BankSparseConfig(calibrate_steps=-1)


@pytest.mark.parametrize("saved", [{"calibrate_steps": 300}, {"calibrate_steps": None}, {}])
def test_saved_sections_of_every_version_load(saved):
    # checkpoints before the scaled default stored 300; newer ones the number that ran (or null: no fit)
    config = config_from_section({"bank_size": 64, "keep": 16, **saved}, "config.json")
    assert config.calibrate_steps == saved.get("calibrate_steps")


def test_convert_cli_calib_steps_default_and_override():
    from upcycle.cli import build_parser
    from upcycle.recipes.bank_sparse.cli import config_from_args

    base = ["convert", "--model", "m", "--out", "o", "--data", "t.txt"]
    assert config_from_args(build_parser().parse_args(base)).calibrate_steps is None
    assert config_from_args(build_parser().parse_args([*base, "--calib-steps", "20"])).calibrate_steps == 20
