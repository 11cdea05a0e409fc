"""FSDP2: 2 gloo processes give the 1-process CAST run (AdamS on row shards, masks of the shards' rows, weight
scales sharded like their weights): same losses, same final exact-2:4 weights. A silent fall-back to plain
AdamW, or masks computed on anything but whole rows, would change both."""

import json
import os
import socket

import torch
import torch.multiprocessing as mp

import upcycle
from upcycle.recipes.nm import exactness, training
from upcycle.train import TrainConfig, train


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, cfg: TrainConfig, log_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    original = training.NMHooks.optimizer

    def record(self, groups, betas):  # what each rank really trains with, and the shards it holds
        opt = original(self, groups, betas)
        nm = [p for g in opt.param_groups if g["nm_mode"] == "cast" for p in g["params"]]
        info = {"optimizer": type(opt).__name__, "nm_params": len(nm),
                "placements": sorted({str(getattr(p, "placements", None)) for p in nm}),
                "local_rows": [p.to_local().shape[0] for p in nm], "full_rows": [p.shape[0] for p in nm]}
        with open(os.path.join(log_dir, f"rank{rank}.json"), "w") as f:
            json.dump(info, f)
        return opt

    training.NMHooks.optimizer = record
    train(cfg)


def _cfg(model, data, out, **kw):
    base = dict(model=str(model), data=[str(data)], out=str(out), seq_len=64, batch_size=4, steps=6, lr=3e-3,
                eval_every=0, save_every=0, progress=False, tensorboard=False, num_threads=1, val_max_sequences=8)
    return TrainConfig.from_dict({**base, **kw})


def test_two_gloo_processes_match_one_process_for_cast(nm_dirs, text_file, tmp_path):
    kw = dict(steps=4, distill_weight=0.5, eval_every=2, val_max_sequences=4, cast_ramp_steps=4,
              mask_refresh_every=2, cast_decay=1e-3, scale_lr_mult=10.0)
    one = train(_cfg(nm_dirs["cast"], text_file, tmp_path / "one", batch_size=2, grad_accum=2, **kw))
    cfg = _cfg(nm_dirs["cast"], text_file, tmp_path / "two", batch_size=2, grad_accum=1, **kw)
    mp.start_processes(_worker, args=(2, _free_port(), cfg, str(tmp_path)), nprocs=2, start_method="fork", join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for info in ranks:
        assert info["optimizer"] == "AdamS" and info["nm_params"] == 6
        assert info["placements"] == ["(Shard(dim=0),)"]  # row shards: every N:M group lies inside one shard
    assert [a + b for a, b in zip(ranks[0]["local_rows"], ranks[1]["local_rows"])] == ranks[0]["full_rows"]
    rows = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    two = {r["step"]: r["loss"] for r in rows}
    assert list(two) == [1, 2, 3, 4]
    assert max(abs(two[s] - one.losses[s]) for s in two) < 2e-4, (one.losses, two)
    assert one.losses[4] < one.losses[1]
    lines = (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()
    mass_one = [json.loads(x).get("nm_pruned_mass") for x in lines]
    assert abs(rows[1]["nm_pruned_mass"] - [m for m in mass_one if m][0]) < 1e-5  # summed over the shards
    a, b = upcycle.load(one.model_dir), upcycle.load(tmp_path / "two" / "model")
    assert exactness(a)["exact"] and exactness(b)["exact"]
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.allclose(sa[k], sb[k], atol=1e-5) for k in sa)
    assert all(torch.equal(sa[k] == 0, sb[k] == 0) for k in sa if "mlp" in k)  # the same 2:4 masks
