import argparse

import pytest

from upcycle.train.config import TrainConfig, add_config_arguments, config_from_args


def _parse(argv):
    p = argparse.ArgumentParser()
    p.add_argument("--config")
    add_config_arguments(p)
    args = p.parse_args(argv)
    return config_from_args(args, args.config)


def test_yaml_flags_and_dataclass_agree(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("model: m\ndata: [a.txt, b.jsonl]\nout: o\nseq_len: 256\ngradient_checkpointing: true\n"
                 "rope_scaling: {rope_type: linear, factor: 2.0}\nlr: 0.001\n")
    from_yaml = _parse(["--config", str(y)])
    from_flags = _parse(["--model", "m", "--data", "a.txt", "b.jsonl", "--out", "o", "--seq-len", "256",
                         "--gradient-checkpointing", "--rope-scaling", '{"rope_type": "linear", "factor": 2.0}',
                         "--lr", "1e-3"])
    assert from_yaml == from_flags == TrainConfig(
        model="m", data=["a.txt", "b.jsonl"], out="o", seq_len=256, gradient_checkpointing=True,
        rope_scaling={"rope_type": "linear", "factor": 2.0}, lr=1e-3)
    # flags override YAML; YAML round-trips
    assert _parse(["--config", str(y), "--seq-len", "32"]).seq_len == 32
    (tmp_path / "back.yaml").write_text(from_yaml.to_yaml())
    assert TrainConfig.from_yaml(tmp_path / "back.yaml") == from_yaml


def test_bad_yaml_key_names_the_fix(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("model: m\nseqlen: 256\n")
    with pytest.raises(ValueError, match="did you mean 'seq_len'"):
        _parse(["--config", str(y)])


def test_bad_values_and_missing_required(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("steps: many\n")
    with pytest.raises(ValueError, match="steps='many' is not a valid int"):
        _parse(["--config", str(y)])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _parse(["--config", str(tmp_path / "nope.yaml")])
    with pytest.raises(ValueError, match="--model"):
        TrainConfig(data=["x"], out="o").validate()
    with pytest.raises(ValueError, match="--data"):
        TrainConfig(model="m", out="o").validate()
    with pytest.raises(ValueError, match="bank-size"):
        TrainConfig(model="m", data=["x"], out="o", recipe={"bank_size": 64}).validate()
    with pytest.raises(ValueError, match="keep_schedule"):
        TrainConfig(model="m", data=["x"], out="o", recipe={"keep_schedule": "exp"}).validate()


def test_cli_help_lists_every_field_and_print_config_merges(tmp_path, capsys):
    from upcycle.cli import main

    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert all(f"--{n.replace('_', '-')}" in text for n in TrainConfig.__dataclass_fields__)
    y = tmp_path / "c.yaml"
    y.write_text("seq_len: 128\nsteps: 7\n")
    assert main(["train", "--config", str(y), "--steps", "9", "--print-config"]) == 0
    merged = TrainConfig.from_dict(__import__("yaml").safe_load(capsys.readouterr().out))
    assert (merged.seq_len, merged.steps) == (128, 9)
