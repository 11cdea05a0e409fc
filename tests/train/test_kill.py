"""kill -9 during checkpoint saves (at seeded points), then --resume: the same losses and weights as a run that
was never interrupted, and never a partial checkpoint or model."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time

import pytest
import torch

import upcycle
from upcycle.train import train
from upcycle.train.checkpoint import list_checkpoints

STEPS = 8


def _kill_when(proc: subprocess.Popen, out, pattern: str, nth: int, timeout: float = 240) -> bool:
    """SIGKILL `proc` as soon as the `nth` distinct hidden temp dir matching `pattern` appears under `out`."""
    seen: set[str] = set()
    t0 = time.time()
    while proc.poll() is None and time.time() - t0 < timeout:
        for root in (out, out / "checkpoints"):
            try:
                names = [e.name for e in os.scandir(root)]
            except FileNotFoundError:
                continue
            seen |= {n for n in names if n.startswith(pattern) and ".tmp-" in n}
        if len(seen) >= nth:
            proc.kill()
            proc.wait()
            return True
        time.sleep(0.0005)
    proc.wait()
    return False


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kill_9_during_a_save_then_resume_matches_the_uninterrupted_run(seed, sparse_dir, text_file, tmp_path,
                                                                        tiny_train_config):
    kw = dict(steps=STEPS, save_every=1, keep_checkpoints=2, keep_warmup_steps=4, distill_weight=0.5, eval_every=4,
              seq_len=32, batch_size=2)
    full = train(tiny_train_config(sparse_dir, [text_file], tmp_path / "full", **kw))
    out = tmp_path / "cut"
    cfg = tiny_train_config(sparse_dir, [text_file], out, **kw)
    rng = random.Random(seed)
    # seed 0, 1: a checkpoint save (the nth of them); seed 2: the final model save
    pattern, nth = (".step_", rng.randint(1, STEPS - 1)) if seed < 2 else (".model", 1)
    argv = [sys.executable, "-m", "upcycle", "train", "--config", str(tmp_path / "cfg.yaml")]
    cfg.to_yaml(tmp_path / "cfg.yaml")
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    killed = _kill_when(proc, out, pattern, nth)
    assert killed, f"the run ended before the kill point: {proc.stderr.read().decode()[-2000:]}"
    # whatever was on disk at the kill: complete checkpoints only, no partial model
    for ck in list_checkpoints(out):
        assert (ck / "trainer_state.json").exists() and (ck / "rng_rank0.safetensors").exists()
    assert not (out / "model").exists() or (out / "model" / "config.json").exists()
    resumed = train(cfg.replace(resume=True))
    assert resumed.model_dir is not None and not resumed.interrupted
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    strip = lambda rs: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rs]  # noqa: E731
    assert strip(rows) == strip(ref)
    a, b = upcycle.load(full.model_dir).state_dict(), upcycle.load(resumed.model_dir).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    leftovers = [p for p in (out.iterdir()) if ".tmp-" in p.name] + [
        p for p in (out / "checkpoints").iterdir() if ".tmp-" in p.name]
    assert leftovers == []  # the resumed run's saves cleaned the killed run's temp dirs
