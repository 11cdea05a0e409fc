"""Predictor initialisation: recall of the oracle top-k-of-bank (by |h|) for random / svd / calibrate.

A small Qwen2-style model is pretrained on the Python standard library's source (offline), then
converted with each init; recall is measured on held-out source the calibration never saw.

    python bench/predictor_init.py            # ~3-6 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from common import RESULTS, machine_record, write_result
from transformers import AutoModelForCausalLM

import upcycle
from upcycle.data import token_windows
from upcycle.recipes.bank_sparse.convert import measure_recall
from upcycle.testing import pretrain, stdlib_corpus, tiny_config, train_bpe_tokenizer


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300, help="pretraining steps of the dense model")
    ap.add_argument("--calib-steps", type=int, default=300)
    ap.add_argument("--ranks", default="16,32", help="predictor ranks to compare")
    ap.add_argument("--out", default=str(RESULTS / "predictor_init"), help="results stem")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    machine = machine_record("cpu", argv, __file__)

    train_docs = stdlib_corpus(3_000_000)
    held_docs = stdlib_corpus(400_000, skip_bytes=3_000_000)
    tok = train_bpe_tokenizer(train_docs[:200], vocab_size=2048)
    train = token_windows(tok, train_docs, 128)
    calib = train[-64:]
    held = token_windows(tok, held_docs, 128, max_windows=32)
    cfg = tiny_config(vocab_size=len(tok), hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2)
    model = AutoModelForCausalLM.from_config(cfg)
    t0 = time.time()
    losses = pretrain(model, train[:-64], steps=args.steps, batch_size=16)
    pre_s = time.time() - t0
    state = {k: v.clone() for k, v in model.state_dict().items()}

    rows = []
    for rank in [int(r) for r in args.ranks.split(",")]:
        for init in ("random", "svd", "calibrate"):
            model.load_state_dict(state)
            m = AutoModelForCausalLM.from_config(cfg)
            m.load_state_dict(state)
            m.eval()
            t = time.time()
            upcycle.convert(m, upcycle.BankSparseConfig(predictor_rank=rank, predictor_init=init,
                                                        calibrate_steps=args.calib_steps),
                            calibration_ids=calib, progress=False)
            seconds = time.time() - t
            recall = measure_recall(m, held)
            rows.append({"init": init, "rank": rank, "recall_mean": sum(recall.values()) / len(recall),
                         "recall_per_layer": [round(v, 4) for v in recall.values()], "convert_s": round(seconds, 1)})
            print(f"rank {rank:>3} {init:>9}: recall {rows[-1]['recall_mean']:.3f}  per layer "
                  f"{rows[-1]['recall_per_layer']}  ({seconds:.1f}s)")

    record = {
        "machine": machine,
        "model": "Qwen2-style d=128, 4 layers, d_ff=512 (8 banks of 64), BPE 2048, pretrained on Python stdlib",
        "pretrain": {"steps": args.steps, "tokens": args.steps * 16 * 128, "loss_first": losses[0],
                     "loss_last": sum(losses[-20:]) / len(losses[-20:]), "seconds": round(pre_s, 1)},
        "calibration_tokens": calib.numel(),
        "held_out_tokens": held.numel(),
        "random_recall": 0.25,
    }
    out = Path(args.out)
    notes = [f"{record['model']}; pretrain {args.steps} steps, final loss {record['pretrain']['loss_last']:.3f}; "
             f"calibration {calib.numel()} tokens, recall on {held.numel()} held-out tokens (random routing: 0.25)."]
    columns = [("method", "init"), ("rank", "rank"), ("recall (mean)", "recall_mean", ".3f"),
               ("per layer", "recall_per_layer"), ("convert s", "convert_s")]
    write_result(out.name, record, rows, columns, "Predictor init: oracle top-16-of-64 recall on held-out text", notes,
                 out=out.parent)


if __name__ == "__main__":
    main()
