"""The training loop's own checks before it trains (src/upcycle/train/loop.py)."""

import json
import logging

from upcycle.train import train


def test_a_run_longer_than_the_data_warns_with_the_epochs_before_training(sparse_dir, corpus, tmp_path,
                                                                          tiny_train_config, caplog):
    small = tmp_path / "small.txt"
    small.write_text(corpus[0][:1500])  # a few 64-token sequences
    cfg = tiny_train_config(sparse_dir, [small], tmp_path / "run", steps=3, batch_size=4, val_fraction=0.0,
                            distill_weight=0.0)
    warned_by_step = []
    with caplog.at_level(logging.WARNING, logger="upcycle.train"):
        train(cfg, on_step=lambda step, record: warned_by_step.append("epochs" in caplog.text))
    n = json.loads((tmp_path / "run" / "run_info.json").read_text())["train_sequences"]
    assert 0 < n < 12
    warned = [r.getMessage() for r in caplog.records if "epochs" in r.getMessage()]
    assert len(warned) == 1, warned
    assert f"{3 * 4 / n:.1f} epochs" in warned[0] and f"holds {n} training sequences" in warned[0]
    assert "Add data" in warned[0] and "--steps" in warned[0]
    assert warned_by_step[0]  # before the first step, not after training


def test_a_run_within_the_data_does_not_warn(sparse_dir, text_file, tmp_path, tiny_train_config, caplog):
    cfg = tiny_train_config(sparse_dir, [text_file], tmp_path / "run", steps=1, batch_size=2, distill_weight=0.0)
    with caplog.at_level(logging.WARNING, logger="upcycle.train"):
        train(cfg)
    assert not [r for r in caplog.records if "epochs" in r.getMessage()]
