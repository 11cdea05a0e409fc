"""`upcycle train ... --plan`: the peak memory of a training step per device, estimated before anything is
allocated, and whether it fits the device.

The model is built on the `meta` device from its config.json (and the recipe section of a converted
checkpoint, or the conversion flags), so parameter counts are exact and no weight is read. The step is
what `upcycle.train` runs: fp32 master weights, AdamW (two fp32 moments), bf16 autocast on GPU (fp32 on
CPU), the frozen teacher (bf16 on GPU) whose final hidden states feed the chunked KD loss, the LM loss a
`loss_chunk_tokens` chunk of logits at a time, each decoder layer checkpointed when asked; under FSDP2 the
student is sharded over the world (bf16 compute copies of the root and of the layers in flight) and the
teacher is not.

The peak is the largest of four moments of the step (`EVENTS`): the teacher's forward, the loss backward
(every saved activation alive plus a chunk of logits), the backward of a decoder layer (the first or the
last one: the saved inputs shrink while the gradients grow), the optimizer step. Saved activations per
token and layer are counted tensor by tensor as autograd saves them under SDPA (tests/train/test_plan.py
checks the count against the bytes autograd really saves); the transient working sets of a layer's
backward and of a logits chunk are multiples of their widths measured on CPU (bench/long_context.py:
within 15% of the peak RSS of real steps at 1K-16K tokens). Everything is linear in the tokens: with SDPA's
flash / memory-efficient kernels no [L, L] tensor exists (if one did, memory per token would grow with L).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

GiB = 1 << 30

# Transient working sets, as multiples of a width per token (fit on CPU fp32 steps, bench/long_context.py):
# a decoder layer's backward beyond its saved tensors (gradients of the FFN intermediates and of q/k/v, the
# residual gradient) and a logits chunk (CE alone; CE + KD to a teacher: student and teacher logits,
# log-softmaxes, their gradients).
MLP_BACKWARD = 4.0  # x d_ff x activation bytes
ATTN_BACKWARD = 4.0  # x (heads + 2 kv heads) x head_dim x activation bytes
LOGITS_CE = 3.0  # x vocab x 4 bytes per chunk row
LOGITS_KD = 7.6
# GPU: what the caching allocator, the CUDA context and NCCL add on top of live tensors; the plan says the
# step fits when the estimate stays under this fraction of the device's memory.
GPU_USABLE = 0.90

EVENTS = ("teacher forward", "loss backward", "backward of the last decoder layer", "backward of the first decoder "
          "layer", "optimizer step")


@dataclass
class Dims:
    """What the plan needs from a model: sizes and exact parameter counts (from a meta-device build)."""

    name: str
    params: int  # unique parameters of the student (tied embeddings once)
    layer_params: int  # one decoder layer (the largest), predictor included
    root_params: int  # outside the decoder layers: embeddings, final norm, LM head
    teacher_params: int
    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    max_positions: int | None
    sparse_layers: int = 0  # bank-sparse FFN layers
    predictor: str | None = None  # "shadow" | "lowrank"
    rank: int = 0
    learned_scores: bool = False  # shadow with a learned bias: its scores are saved for the backward
    bank_size: int = 64
    keep: int = 16
    qk_norm: bool = False  # per-head RMSNorm of q and k (Qwen3)


@dataclass
class Setup:
    seq_len: int
    batch_size: int = 1
    gradient_checkpointing: bool = False
    world_size: int = 1
    device: str = "cpu"  # "cpu" | "cuda"
    bf16: bool = False  # bf16 autocast (the trainer's default on GPU)
    teacher_bytes: int | None = 4  # bytes per teacher parameter; None: no teacher (no distillation)
    loss_chunk_tokens: int = 2048
    train_only_ffn: bool = False
    trainable_params: int | None = None  # None: all


@dataclass
class Plan:
    dims: Dims
    setup: Setup
    peak_bytes: int
    peak_event: str
    breakdown: dict[str, int]  # at the peak: weights, gradients, optimizer, activations, logits, teacher
    events: dict[str, int]
    per_token_bytes: float  # activation bytes per token at the peak (flat in L when nothing is quadratic)
    device_bytes: int | None = None
    device_name: str | None = None
    notes: list[str] = field(default_factory=list)
    longest_fitting: int | None = None  # the longest seq_len (multiple of 1024) that fits the device

    @property
    def fits(self) -> bool | None:
        if not self.device_bytes:
            return None
        usable = self.device_bytes * (GPU_USABLE if self.setup.device == "cuda" else 1.0)
        return self.peak_bytes <= usable

    def to_dict(self) -> dict:
        return {"dims": asdict(self.dims), "setup": asdict(self.setup), "peak_bytes": self.peak_bytes,
                "peak_gib": self.peak_bytes / GiB, "peak_event": self.peak_event, "breakdown": self.breakdown,
                "events": self.events, "per_token_bytes": self.per_token_bytes, "device_bytes": self.device_bytes,
                "device_name": self.device_name, "fits": self.fits, "longest_fitting_seq_len": self.longest_fitting,
                "notes": self.notes}


# ---------------------------------------------------------------------------------------------- the model
def dims_from_model(model: nn.Module, name: str = "model", teacher: nn.Module | None = None) -> Dims:
    """Dims of a (meta or real) HF causal LM, converted or not; `teacher`: its dense teacher (default: the
    student minus its routing parameters)."""
    from upcycle import hf

    c = model.config
    layers = hf.decoder_layers(model)
    params = sum(p.numel() for p in model.parameters())
    layer_params = max(sum(p.numel() for p in layer.parameters()) for layer in layers)
    root = params - sum(p.numel() for layer in layers for p in layer.parameters())
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    ffns = hf.glu_modules(model)
    sparse = [m for _, _, m in ffns if hasattr(m, "bank_size") and hasattr(m, "predictor")]
    routing = sum(p.numel() for m in sparse for p in m.predictor.parameters()) + sum(
        p.numel() for m in sparse if getattr(m, "gate_scale", None) is not None for p in [m.gate_scale])
    d = Dims(name=name, params=params, layer_params=layer_params, root_params=root,
             teacher_params=sum(p.numel() for p in teacher.parameters()) if teacher is not None else params - routing,
             layers=len(layers), hidden=c.hidden_size, ffn=ffns[0][2].gate_proj.out_features if ffns else
             c.intermediate_size, heads=heads, kv_heads=getattr(c, "num_key_value_heads", None) or heads,
             head_dim=head_dim, vocab=c.vocab_size, max_positions=getattr(c, "max_position_embeddings", None))
    d.qk_norm = getattr(getattr(layers[0], "self_attn", None), "q_norm", None) is not None
    if sparse:
        m = sparse[0]
        d.sparse_layers, d.predictor, d.bank_size, d.keep = len(sparse), m.predictor.kind, m.bank_size, m.target_keep
        d.rank = getattr(m.predictor, "rank", 0) if m.predictor.kind == "lowrank" else 0
        d.learned_scores = m.predictor.kind == "shadow" and any(True for _ in m.predictor.parameters())
    return d


def meta_model(path: str | os.PathLike, convert_config=None) -> nn.Module:
    """The model of checkpoint `path` built on the meta device (config.json only; no weight is read), with the
    recipe's modules of a converted checkpoint, or converted with `convert_config`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from upcycle import format as fmt
    from upcycle.recipes import registry

    p = Path(path)
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{p}/config.json does not exist: pass a checkpoint directory to --model.")
    raw = json.loads((p / "config.json").read_text())
    meta = fmt.parse(raw.get(fmt.KEY), f"{p}/config.json")
    raw.pop(fmt.KEY, None)
    if meta is not None and str(raw.get("model_type", "")).startswith("upcycle_"):
        raw["model_type"] = raw["model_type"].removeprefix("upcycle_")
    config = AutoConfig.for_model(**raw)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    if meta is not None:
        recipe = registry.get(meta.recipe)
        recipe.from_metadata(model, meta.section)
    elif convert_config is not None:
        import upcycle

        upcycle.convert(model, convert_config, progress=False)
    return model


# ---------------------------------------------------------------------------------------------- the arithmetic
def _regime(s: Setup) -> str:
    if s.world_size > 1 and s.bf16:
        return "bf16"  # FSDP2 bf16 params: everything bf16, residual stream included
    return "autocast" if s.bf16 else "fp32"


def layer_saved_per_token(d: Dims, s: Setup, sparse: bool = True) -> float:
    """Bytes autograd saves per token in one decoder layer's forward (SDPA flash / memory-efficient)."""
    regime = _regime(s)
    a = 2 if s.bf16 else 4
    norm = {"fp32": 12, "autocast": 10, "bf16": 8}[regime] * d.hidden + 4  # input, normalised, linear input
    attn = a * (2 * d.heads + 2 * d.kv_heads) * d.head_dim + 4 * d.heads  # q, k, v, output; logsumexp
    if d.qk_norm:  # the per-head norms of q and k save their input and the normalised values
        attn += ({"fp32": 8, "autocast": 10, "bf16": 10}[regime] * d.head_dim + 4) * (d.heads + d.kv_heads)
    if sparse and d.sparse_layers:
        mlp = 3 * a * d.ffn + d.ffn  # gate, up, masked product; the bool mask
        if d.predictor == "lowrank":
            mlp += a * d.rank
        elif d.learned_scores:
            mlp += a * d.ffn
    else:
        mlp = 4 * a * d.ffn  # gate, silu(gate), up, product
    return 2 * norm + attn + mlp


def globals_per_token(d: Dims, s: Setup, last_hidden: bool = True) -> float:
    """Saved outside the decoder layers, per token: token ids, RoPE cos/sin, the final norm's saved tensors, and
    (`last_hidden`) the final hidden states the chunked loss reads."""
    norm = {"fp32": 8, "autocast": 8, "bf16": 6}[_regime(s)] * d.hidden + 4
    return 8 + 2 * residual_bytes(s) * d.head_dim + norm + (residual_bytes(s) * d.hidden if last_hidden else 0)


def residual_bytes(s: Setup) -> int:
    return 2 if _regime(s) == "bf16" else 4


def layer_backward_per_token(d: Dims, s: Setup) -> float:
    """A decoder layer's backward working set beyond its saved tensors, per token."""
    a = 2 if s.bf16 else 4
    return (MLP_BACKWARD * d.ffn + ATTN_BACKWARD * (d.heads + 2 * d.kv_heads) * d.head_dim) * a \
        + 2 * residual_bytes(s) * d.hidden


def plan(d: Dims, s: Setup) -> Plan:
    """The step's memory per device (see the module docstring); pure arithmetic on `d` and `s`."""
    if s.seq_len < 2 or s.batch_size < 1 or s.world_size < 1:
        raise ValueError("seq_len must be >= 2, batch_size and world_size >= 1.")
    T = s.seq_len * s.batch_size
    N = s.world_size
    r = residual_bytes(s)
    trainable = d.params if s.trainable_params is None else s.trainable_params
    fsdp = N > 1
    # --- persistent state
    weights = 4 * d.params / N
    if fsdp:  # compute copies: the root for the whole step, two layers in flight (one prefetched)
        weights += (2 if s.bf16 else 4) * (d.root_params + 2 * d.layer_params)
    optimizer = 8 * trainable / N
    grads_full = 4 * trainable / N
    grads_layer_unsharded = (6 if s.bf16 else 4) * d.layer_params if fsdp else 0  # before the reduce-scatter
    teacher = 0 if s.teacher_bytes is None else s.teacher_bytes * d.teacher_params
    teacher_hidden = 0 if s.teacher_bytes is None else (2 if s.bf16 else 4) * T * d.hidden
    head_params = max(d.root_params - d.hidden, 0)  # embeddings / LM head: their gradient comes first
    head_grad = 4 * head_params / N * (trainable / d.params)
    # --- activations
    full_layer = layer_saved_per_token(d, s) * T
    routing_bits = d.ffn / 8 if d.sparse_layers and s.gradient_checkpointing else 0
    saved_layer = (r * d.hidden + routing_bits) * T if s.gradient_checkpointing else full_layer
    globals_ = T * globals_per_token(d, s)
    chunk = min(s.loss_chunk_tokens or T, T)
    logits = chunk * d.vocab * 4 * (LOGITS_KD if s.teacher_bytes is not None else LOGITS_CE)
    if s.bf16:
        logits += chunk * d.vocab * 2 * (2 if s.teacher_bytes is not None else 1)  # bf16 logits before the upcast
    backward = layer_backward_per_token(d, s) * T
    # teacher forward: one layer's forward intermediates (nothing saved) and its hidden states
    t_layer = 0 if s.teacher_bytes is None else T * ((4 * d.ffn + (2 * d.heads + 2 * d.kv_heads) * d.head_dim)
                                                      * (2 if s.bf16 else 4) + 3 * d.hidden * 4)
    static = weights + optimizer
    ev: dict[str, dict[str, float]] = {}
    ev["teacher forward"] = {"weights": weights, "gradients": 0, "optimizer": optimizer, "activations": 0,
                             "logits": 0, "teacher": teacher + teacher_hidden + t_layer}
    ev["loss backward"] = {"weights": weights, "gradients": head_grad, "optimizer": optimizer,
                           "activations": d.layers * saved_layer + globals_, "logits": logits,
                           "teacher": teacher + teacher_hidden}
    recompute = full_layer if s.gradient_checkpointing else 0
    ev["backward of the last decoder layer"] = {
        "weights": weights, "gradients": head_grad + 4 * d.layer_params / N + grads_layer_unsharded,
        "optimizer": optimizer, "activations": d.layers * saved_layer + globals_ + recompute + backward,
        "logits": 0, "teacher": teacher + teacher_hidden}
    first_saved = saved_layer if s.gradient_checkpointing else full_layer
    ev["backward of the first decoder layer"] = {
        "weights": weights, "gradients": grads_full + grads_layer_unsharded, "optimizer": optimizer,
        "activations": first_saved + T * (8 + 2 * r * d.head_dim) + recompute + backward, "logits": 0,
        "teacher": teacher + teacher_hidden}
    biggest = max(d.vocab * d.hidden, d.layer_params)
    ev["optimizer step"] = {"weights": weights, "gradients": grads_full, "optimizer": optimizer,
                            "activations": 0, "logits": 0, "teacher": teacher + 2 * 4 * biggest / N}
    totals = {k: int(sum(v.values())) for k, v in ev.items()}
    peak_event = max(totals, key=totals.get)
    breakdown = {k: int(v) for k, v in ev[peak_event].items()}
    per_token = breakdown["activations"] / T
    del static
    return Plan(d, s, totals[peak_event], peak_event, breakdown, totals, per_token)


# ---------------------------------------------------------------------------------------------- the device
def device_memory(device: str) -> tuple[int | None, str]:
    """(bytes, name) of the device a run would use: the GPU's total memory, or the machine's available RAM."""
    if device == "cuda" and torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        return total, torch.cuda.get_device_name()
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        return int(info["MemAvailable"].split()[0]) * 1024, "CPU RAM (available)"
    except (OSError, KeyError, ValueError):
        return None, "CPU RAM (unknown)"


def plan_config(cfg, world_size: int | None = None, device: str | None = None, memory_gb: float | None = None) -> Plan:
    """The plan of `upcycle train` with TrainConfig `cfg` (world size: WORLD_SIZE, else 1; device: as the trainer
    picks it; memory: what the device has, or `memory_gb`)."""
    resolved = cfg.resolve_recipe()
    if not cfg.model:
        raise ValueError("no model: pass --model DIR (its config.json is all the plan reads).")
    model = meta_model(cfg.model, resolved.convert_config)
    student_name = Path(cfg.model).name
    teacher = None
    if cfg.teacher:
        teacher = meta_model(cfg.teacher)
    d = dims_from_model(model, student_name, teacher)
    world = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    dev = device or ("cuda" if cfg.device in ("auto", "cuda") and torch.cuda.is_available() else
                     "cuda" if cfg.device == "cuda" else "cpu")
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and dev == "cuda")
    distill = cfg.distill_weight > 0 or cfg.feature_distill_weight > 0
    tbytes = None
    if distill:
        tbytes = {"bf16": 2, "fp32": 4}.get(cfg.teacher_dtype, 2 if dev == "cuda" else 4)
    trainable = None
    if cfg.train_only == "ffn":
        from upcycle.train.models import ffn_parameter_names

        names = ffn_parameter_names(model)
        trainable = sum(p.numel() for n, p in model.named_parameters() if n in names)
    s = Setup(seq_len=cfg.seq_len, batch_size=cfg.batch_size, gradient_checkpointing=cfg.gradient_checkpointing,
              world_size=world, device=dev, bf16=bf16, teacher_bytes=tbytes, loss_chunk_tokens=cfg.loss_chunk_tokens,
              train_only_ffn=cfg.train_only == "ffn", trainable_params=trainable)
    p = plan(d, s)
    if memory_gb is not None:
        p.device_bytes, p.device_name = int(memory_gb * 1e9), f"{memory_gb:g} GB ({dev}, given)"
    else:
        p.device_bytes, p.device_name = device_memory(dev)
    if d.max_positions and cfg.seq_len > d.max_positions and not (cfg.rope_scaling or cfg.max_position_embeddings):
        p.notes.append(f"seq_len {cfg.seq_len} exceeds max_position_embeddings {d.max_positions}: pass --rope-scaling "
                       "(and --max-position-embeddings) to train at this length.")
    if p.fits is False:
        p.notes += hints(p)
    if p.device_bytes:
        p.longest_fitting = max_fitting_seq_len(d, s, p.device_bytes)
    if cfg.attn_implementation == "eager":
        p.notes.append("--attn-implementation eager materialises [heads, L, L] attention weights per layer: the "
                       "estimate (SDPA) is too low; use sdpa.")
    return p


def hints(p: Plan) -> list[str]:
    """What would make a step that does not fit fit, largest component first."""
    s, b = p.setup, p.breakdown
    state = b["weights"] + b["gradients"] + b["optimizer"]
    out = []
    order = sorted(("state", "activations", "logits", "teacher"), key=lambda k: -(state if k == "state" else b[k]))
    for k in order:
        if k == "state" and state > 0.25 * p.peak_bytes:
            n = next((n for n in (2, 4, 8, 16, 32, 64) if p.device_bytes and plan(p.dims, Setup(**{
                **asdict(s), "world_size": n})).peak_bytes <= p.device_bytes * (GPU_USABLE if s.device == "cuda"
                                                                                 else 1.0)), None)
            shard = f"it fits with --plan-world-size {n}" if n else "check with --plan-world-size N"
            out.append(f"weights + gradients + AdamW take {state / GiB:.1f} GiB: shard them with FSDP2 (torchrun "
                       f"--nproc-per-node N; {shard}), or train fewer parameters (--train-only ffn)")
        elif k == "activations" and b["activations"] > 0.25 * p.peak_bytes:
            out.append(f"activations take {b['activations'] / GiB:.1f} GiB: " + (
                "lower --seq-len or --batch-size" if s.gradient_checkpointing else "pass --gradient-checkpointing"))
        elif k == "logits" and b["logits"] > 0.25 * p.peak_bytes:
            out.append(f"the logits chunk takes {b['logits'] / GiB:.1f} GiB: lower --loss-chunk-tokens")
        elif k == "teacher" and b["teacher"] > 0.25 * p.peak_bytes:
            out.append(f"the teacher takes {b['teacher'] / GiB:.1f} GiB: --teacher-dtype bf16, or --distill-weight 0")
    return out


def format_plan(p: Plan) -> str:
    d, s = p.dims, p.setup
    kind = (f"bank-sparse {d.keep}/{d.bank_size} in {d.sparse_layers}/{d.layers} layers, {d.predictor} predictor"
            + (f" rank {d.rank}" if d.rank else "")) if d.sparse_layers else "dense"
    regime = {"fp32": "fp32", "autocast": "bf16 autocast, fp32 master weights",
              "bf16": "FSDP2 bf16 compute, fp32 master weights"}[_regime(s)]
    T = s.seq_len * s.batch_size
    lines = [
        f"plan: {d.name}: {d.params / 1e9:.3g}B parameters, {d.layers} layers, d {d.hidden}, d_ff {d.ffn}, vocab "
        f"{d.vocab} ({kind})",
        f"  {s.seq_len} tokens x batch {s.batch_size} = {T} tokens per micro-batch; gradient checkpointing "
        f"{'on' if s.gradient_checkpointing else 'off'}; {s.world_size} process(es)"
        f"{' (FSDP2)' if s.world_size > 1 else ''} on {s.device}; {regime}; teacher "
        f"{'none' if s.teacher_bytes is None else ('bf16' if s.teacher_bytes == 2 else 'fp32')}; logits "
        f"{min(s.loss_chunk_tokens or T, T)} tokens at a time",
        "",
        f"  {'per device':<52} {'GiB':>9}",
    ]
    labels = {"weights": "weights" + (" (fp32 shard + bf16/fp32 compute copies)" if s.world_size > 1 else " (fp32)"),
              "gradients": "gradients (fp32)", "optimizer": "optimizer state (AdamW, 2 x fp32)",
              "activations": "activations" + (" (checkpointed)" if s.gradient_checkpointing else ""),
              "logits": "logits and loss (one chunk)", "teacher": "teacher (weights + hidden states)"}
    for k, label in labels.items():
        lines.append(f"  {label:<52} {p.breakdown[k] / GiB:>9.2f}")
    lines.append(f"  {'peak (at the ' + p.peak_event + ')':<52} {p.peak_bytes / GiB:>9.2f}")
    lines.append(f"  activations at the peak: {p.per_token_bytes / 1024:.1f} KiB per token (linear in the length: "
                 "no [L, L] tensor with SDPA)")
    if p.device_bytes:
        verdict = "fits" if p.fits else "does NOT fit"
        usable = " (of which 90% usable)" if s.device == "cuda" else ""
        lines.append(f"  device: {p.device_name}, {p.device_bytes / GiB:.1f} GiB{usable}: {verdict} "
                     f"({100 * p.peak_bytes / p.device_bytes:.0f}% of it)")
    if p.device_bytes:
        lines.append(f"  longest --seq-len that fits (batch {s.batch_size}): "
                     f"{p.longest_fitting if p.longest_fitting else 'none (not even 1024)'}")
    for n in p.notes:
        lines.append(f"  note: {n}")
    return "\n".join(lines)


def max_fitting_seq_len(d: Dims, s: Setup, device_bytes: int) -> int | None:
    """The longest sequence (multiple of 1024) whose plan fits `device_bytes` (None: not even 1024)."""
    usable = device_bytes * (GPU_USABLE if s.device == "cuda" else 1.0)
    best, n = None, 1024
    while n <= 1 << 22:
        if plan(d, Setup(**{**asdict(s), "seq_len": n})).peak_bytes > usable:
            break
        best, n = n, n * 2
    if best is None:
        return None
    lo, hi = best, n
    while hi - lo > 1024:
        mid = (lo + hi) // 2 // 1024 * 1024
        if plan(d, Setup(**{**asdict(s), "seq_len": mid})).peak_bytes <= usable:
            lo = mid
        else:
            hi = mid
    return lo if math.isfinite(lo) else None
