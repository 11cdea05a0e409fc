"""2 CPU processes (gloo, FSDP2) give the losses of 1 process on the same global batches, with the MoE hooks (aux
losses, router LR group) on and the experts' 3-D weights sharded."""

import json
import os
import socket

import torch.multiprocessing as mp

from upcycle.train import TrainConfig, train


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, cfg: TrainConfig) -> None:
    import torch

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    train(cfg)


def test_two_gloo_processes_match_one_process(moe_dir, text_file, tmp_path, tiny_train_config):
    kw = dict(steps=4, distill_weight=0.5, router_lr_mult=3.0, eval_every=2, val_max_sequences=4)
    one = train(tiny_train_config(moe_dir, [text_file], tmp_path / "one", batch_size=2, grad_accum=2, **kw))
    cfg = tiny_train_config(moe_dir, [text_file], tmp_path / "two", batch_size=2, grad_accum=1, **kw)
    # fork: the children reuse this process's imports (spawn would re-import torch + transformers twice)
    mp.start_processes(_worker, args=(2, _free_port(), cfg), nprocs=2, start_method="fork", join=True)
    rows = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    one_rows = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    two = {r["step"]: r["loss"] for r in rows}
    assert list(two) == [1, 2, 3, 4]
    assert max(abs(two[s] - one.losses[s]) for s in two) < 2e-4, (one.losses, two)
    for a, b in zip(rows, one_rows, strict=True):  # the aux losses are all-reduced like the loss
        assert abs(a["load_balance"] - b["load_balance"]) < 2e-4 and abs(a["z_loss"] - b["z_loss"]) < 2e-3
    assert abs(rows[-1]["val_loss"] - one.val_loss) < 2e-4
    assert one.losses[4] < one.losses[1]  # it trains (the comparison is not between two frozen models)
    info = json.loads((tmp_path / "two" / "run_info.json").read_text())
    assert info["world_size"] == 2 and info["recipe"] == "moe"
    import upcycle

    assert upcycle.load(tmp_path / "two" / "model") is not None
    assert (tmp_path / "two" / "expert_load.png").exists()
