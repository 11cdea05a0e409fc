"""`train(config)`: continual training of a converted (or dense) model, one process or many (torchrun).

The loop is recipe-agnostic: the recipe the model was converted with supplies `TrainHooks` (optimizer
groups, per-step schedules, auxiliary losses by name, a post-optimizer-step hook); a dense model trains
with the no-op hooks (the matched-token dense control)."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

import upcycle
from upcycle.data import load_tokenizer
from upcycle.data.packing import PackedData, build_data
from upcycle.recipes import registry
from upcycle.recipes.registry import TrainHooks
from upcycle.train import checkpoint as ckpt
from upcycle.train.config import TrainConfig
from upcycle.train.distributed import DistEnv, init_distributed, shard
from upcycle.train.metrics import MetricsLog, plot_loss_curve, read_metrics
from upcycle.train.models import DTYPES, build_student, build_teacher, ffn_parameter_names, module_bytes, train_hooks
from upcycle.train.objective import Objective, teacher_hidden_states
from upcycle.train.schedules import lr_factor

log = logging.getLogger("upcycle.train")


class TrainingStopped(RuntimeError):
    """Training stopped on its own (e.g. the loss stayed non-finite): no final model was written."""

    exit_code = 3


@dataclass
class TrainResult:
    out: Path
    model_dir: Path | None  # the final model (upcycle.load reads it); None when interrupted
    step: int  # optimizer steps done in total (including before a resume)
    interrupted: bool
    losses: dict[int, float] = field(default_factory=dict)  # step -> training loss, this run's steps
    val_loss: float | None = None


class _StopFlag:
    """Ctrl-C / SIGTERM: finish the current step, checkpoint, stop. A second Ctrl-C aborts at once."""

    def __init__(self):
        self.requested = False
        self._old: dict[int, object] = {}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("\n%s: saving a checkpoint after this step (Ctrl-C again to abort without saving)",
                    signal.Signals(signum).name)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def build_optimizer(objective: nn.Module, cfg: TrainConfig, hooks: TrainHooks | None = None) -> torch.optim.Optimizer:
    """AdamW (or the recipe's optimizer); groups: matrices (decay), vectors (no decay), then the recipe's
    groups (e.g. the bank-sparse predictor: LR x predictor_lr_mult, no decay)."""
    hooks = hooks or TrainHooks()
    groups: dict[str, list] = {"decay": [], "no_decay": [], **{k: [] for k in hooks.param_groups}}
    for name, p in objective.named_parameters():
        if not p.requires_grad:
            continue
        key = hooks.param_group(name.removeprefix("model.")) or ("decay" if p.ndim >= 2 else "no_decay")
        groups[key].append(p)
    spec = [
        {"params": groups["decay"], "lr": cfg.lr, "weight_decay": cfg.weight_decay, "name": "decay"},
        {"params": groups["no_decay"], "lr": cfg.lr, "weight_decay": 0.0, "name": "no_decay"},
    ]
    for key, opts in hooks.param_groups.items():
        spec.append({"params": groups[key], "lr": cfg.lr * opts.get("lr_mult", 1.0),
                     "weight_decay": opts.get("weight_decay", cfg.weight_decay), "name": key})
    spec = [g for g in spec if g["params"]]
    if not spec:
        raise ValueError("no trainable parameters (train_only='ffn' on a model without SwiGLU FFNs?).")
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    custom = hooks.optimizer(spec, betas)
    if custom is not None:
        return custom
    fused = all(g["params"][0].is_cuda for g in spec)
    return torch.optim.AdamW(spec, betas=betas, fused=fused or None)


def _autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


@torch.no_grad()
def evaluate(objective: Objective, data: PackedData, cfg: TrainConfig, env: DistEnv, bf16: bool) -> float | None:
    """Mean held-out CE. Every rank runs the same number of forwards (FSDP forwards are collective)."""
    per_rank = len(data.val_idx) // env.world
    if per_rank == 0:
        return None
    was_training = objective.training
    objective.eval()
    total = 0.0
    idx = data.val_idx[: per_rank * env.world][env.rank :: env.world]
    for i in range(0, per_rank, cfg.batch_size):
        ids = data.fetch(idx[i : i + cfg.batch_size]).to(env.device)
        with _autocast(env.device, bf16):
            total += objective(ids)["ce"].item() * len(ids)
    objective.train(was_training)
    return env.sum([total])[0] / (per_rank * env.world)


def train(cfg: TrainConfig, on_step: Callable[[int, dict], None] | None = None,
          on_eval: Callable[[int, nn.Module], dict | None] | None = None) -> TrainResult:
    """Run (or resume) training as `cfg` says. `on_step(step, record)` is called after every step;
    `on_eval(step, model)` at every validation (eval mode, no grad, main process; under FSDP the model
    is sharded) and may return extra metrics for metrics.jsonl (e.g. held-out perplexity).

    Under torchrun every process calls this; the process group is created here from the environment.
    """
    cfg.validate()
    env = init_distributed(cfg.device)
    if not env.is_main:  # one copy of the log, from rank 0; warnings still come from every rank
        logging.getLogger("upcycle").setLevel(logging.WARNING)
    try:
        return _Trainer(cfg, env).run(on_step, on_eval)
    finally:
        env.close()


class _Trainer:
    def __init__(self, cfg: TrainConfig, env: DistEnv):
        self.cfg, self.env = cfg, env
        self.out = Path(cfg.out)
        self.bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and env.device.type == "cuda")
        self.nonfinite_run = self.nonfinite_total = 0
        self.loss_mean = (0.0, 0)  # running mean of finite losses, number seen

    # ------------------------------------------------------------------ setup
    def _check_out(self) -> Path | None:
        cfg, out = self.cfg, self.out
        existing = ckpt.list_checkpoints(out)
        if cfg.resume:
            if not existing:
                log.warning("--resume: no checkpoint in %s/checkpoints, starting from step 0", out)
            return existing[-1] if existing else None
        if existing or (out / "metrics.jsonl").exists():
            raise ValueError(f"{out} already holds a training run: pass --resume to continue it, or a new --out.")
        return None

    def _finished_step(self) -> int | None:
        """The step of a finished run being resumed with --steps no larger than it (nothing to do), else None."""
        if self.resume_from is None:
            return None
        done = int(json.loads((self.resume_from / ckpt.STATE_FILE).read_text())["step"])
        model_dir = self.out / "model"
        if done >= self.cfg.steps and (model_dir / "config.json").exists():
            return done
        if done > self.cfg.steps:
            raise ValueError(f"--resume: the newest checkpoint ({self.resume_from.name}) is past --steps "
                             f"{self.cfg.steps}: pass --steps > {done} to continue the run.")
        return None

    def setup(self) -> None:
        cfg, env = self.cfg, self.env
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        # every rank checks (OUT is shared): an error raised on rank 0 alone would leave the others waiting
        self.resume_from = self._check_out()
        self.finished = self._finished_step()
        env.barrier()
        if self.finished is not None:
            return  # a complete run: touch nothing (no data, no model, no metrics rewrite)
        if env.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed)

        self.tokenizer = load_tokenizer(cfg.tokenizer or cfg.model)
        self.data = build_data(cfg, self.tokenizer, env.is_main, env.barrier)
        if env.is_main:
            self._warn_repeated_data()

        student, self.saved_dtype = build_student(cfg)
        self.recipe = registry.for_model(student)
        self.sparse = self.recipe is not None
        self.hooks = train_hooks(student, cfg)
        if cfg.train_only == "ffn":
            keep = ffn_parameter_names(student)
            for n, p in student.named_parameters():
                p.requires_grad_(n in keep)
        student.to(env.device)
        self.objective = Objective(student, cfg.distill_weight, cfg.distill_temperature, cfg.loss_chunk_tokens,
                                   cfg.feature_distill_weight)

        self.teacher, self.teacher_info = None, None
        if cfg.distill_weight > 0 or cfg.feature_distill_weight > 0:
            tdtype = DTYPES["bf16" if cfg.teacher_dtype == "auto" and env.device.type == "cuda" else
                            "fp32" if cfg.teacher_dtype == "auto" else cfg.teacher_dtype]
            before = torch.cuda.memory_allocated(env.device) if env.device.type == "cuda" else 0
            self.teacher, teacher_from = build_teacher(cfg, env.device, tdtype)
            if self.teacher.config.vocab_size != student.config.vocab_size:
                raise ValueError(f"teacher vocab {self.teacher.config.vocab_size} != student vocab "
                                 f"{student.config.vocab_size}: pass a --teacher with the student's tokenizer.")
            self.teacher_info = {
                "path": teacher_from, "dtype": str(tdtype).removeprefix("torch."),
                "param_bytes": module_bytes(self.teacher),
                "device_bytes": (torch.cuda.memory_allocated(env.device) - before) if env.device.type == "cuda"
                else None,
            }
        if env.world > 1:
            shard(self.objective, env, self.bf16)
        self.optimizer = build_optimizer(self.objective, cfg, self.hooks)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, cfg.steps, cfg.warmup_steps, cfg.min_lr_ratio))
        self.state = {"step": 0, "consumed": 0, "tokens": 0, "seq_len": cfg.seq_len, "seed": cfg.seed}
        if self.resume_from:
            saved = ckpt.load_checkpoint(self.resume_from, self.objective, self.optimizer, self.scheduler, env)
            for key in ("seq_len", "seed"):  # the data position means nothing under another packing or order
                if saved.get(key, self.state[key]) != self.state[key]:
                    raise ValueError(f"--resume: the checkpoint was trained with {key}={saved[key]}, this run has "
                                     f"{self.state[key]}; resume with the same --{key.replace('_', '-')}.")
            self.state.update({k: saved[k] for k in ("step", "consumed", "tokens")})
            log.info("resumed from %s (step %d)", self.resume_from, self.state["step"])
        self.metrics = MetricsLog(self.out, env.is_main, cfg.tensorboard, resume_step=self.state["step"])
        if env.is_main:
            self._write_run_info(student)

    def _write_run_info(self, student: nn.Module) -> None:
        cfg, env = self.cfg, self.env
        cfg.to_yaml(self.out / "config.yaml")
        n_params = sum(p.numel() for p in student.parameters())
        info = {
            "world_size": env.world, "device": str(env.device), "bf16_autocast": self.bf16,
            "sparse": self.sparse, "recipe": self.recipe.name if self.recipe else None, "parameters": n_params,
            "trainable_parameters": sum(p.numel() for p in student.parameters() if p.requires_grad),
            "global_batch_sequences": self.global_batch, "tokens_per_step": self.global_batch * cfg.seq_len,
            "train_sequences": len(self.data.train_idx), "val_sequences": len(self.data.val_idx),
            "teacher": self.teacher_info,
        }
        (self.out / "run_info.json").write_text(json.dumps(info, indent=1))
        log.info("training %s%s model, %.1fM params, %d process(es) on %s, %d tokens/step",
                 self.recipe.name if self.recipe else "dense", " (FFN only)" if cfg.train_only == "ffn" else "",
                 n_params / 1e6, env.world, env.device, info["tokens_per_step"])
        if self.teacher_info:
            t = self.teacher_info
            mem = f", {t['device_bytes'] / 2**30:.2f} GiB on {env.device}" if t["device_bytes"] is not None else ""
            log.info("teacher: %s, %s, %.2f GiB of weights%s, no gradients", t["path"], t["dtype"],
                     t["param_bytes"] / 2**30, mem)

    def _warn_repeated_data(self) -> None:
        """A run that consumes more sequences than the data holds repeats it (reshuffled each epoch): say so
        before training, since a small file otherwise trains many epochs without a word."""
        cfg, n = self.cfg, len(self.data.train_idx)
        consumed = cfg.steps * self.global_batch
        if consumed > n:
            log.warning("the run consumes %d sequences (--steps %d x %d sequences per step) but the data holds %d "
                        "training sequences of %d tokens: it will make %.1f epochs over the same data. Add data, or "
                        "lower --steps (%d steps make one epoch).", consumed, cfg.steps, self.global_batch, n,
                        cfg.seq_len, consumed / n, max(1, n // self.global_batch))

    @property
    def global_batch(self) -> int:
        return self.cfg.batch_size * self.cfg.grad_accum * self.env.world

    # ------------------------------------------------------------------ one step
    def step(self, step: int) -> dict:
        cfg, env, objective, hooks = self.cfg, self.env, self.objective, self.hooks
        schedule = self.last_schedule = hooks.before_step(step)  # shown on the progress bar too
        aux_weights = hooks.aux_weights(step)
        hooks.begin_aux(set(aux_weights))
        head = self.teacher.get_output_embeddings() if self.teacher is not None else None
        sums: dict[str, float] = {}
        features = cfg.feature_distill_weight > 0
        try:
            for micro in range(cfg.grad_accum):
                ids = self.data.micro_batch(self.state["consumed"], self.global_batch, env.rank, micro,
                                            cfg.batch_size, cfg.grad_accum).to(env.device)
                if env.world > 1:  # reduce-scatter gradients once per step, not per micro-batch
                    objective.set_requires_gradient_sync(micro == cfg.grad_accum - 1)
                with _autocast(env.device, self.bf16):
                    th = teacher_hidden_states(self.teacher, ids, features) if self.teacher is not None else None
                    tf = None
                    if features:
                        th, tf = th
                    parts = objective(ids, th, head, aux_weights, tf)
                (parts["loss"] / cfg.grad_accum).backward()
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach().double().cpu())
        finally:
            hooks.end_aux()
        params = [p for p in objective.parameters() if p.requires_grad]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        names = sorted(sums)  # every rank has the same names: one all-reduce of all of them
        means = dict(zip(names, env.mean([sums[k] / cfg.grad_accum for k in names]), strict=True))
        # Both are global (all-reduced loss, FSDP's global norm): every rank takes the same decision.
        finite = math.isfinite(means["loss"]) and math.isfinite(float(grad_norm))
        if finite:
            self.optimizer.step()
            self.nonfinite_run = 0
        else:
            self.nonfinite_run += 1
            self.nonfinite_total += 1
            log.warning("step %d: loss %s, gradient norm %s: update skipped (%d in a row)", step + 1,
                        means["loss"], float(grad_norm), self.nonfinite_run)
        self.scheduler.step()  # the LR stays a function of the step, updates skipped or not
        self.optimizer.zero_grad(set_to_none=True)
        if finite:
            hooks.after_optimizer_step(step)
            self._watch_spikes(step, means["loss"])
        record = {"loss": means["loss"], "ce": means["ce"],
                  "lr": cfg.lr * lr_factor(step, cfg.steps, cfg.warmup_steps, cfg.min_lr_ratio),
                  **schedule, "grad_norm": float(grad_norm)}
        if self.teacher is not None:
            record["kl"] = means["kl"]
        for name, w in aux_weights.items():
            record[name], record[f"{name}_weight"] = means.get(name, 0.0), w
        if features:
            record["feat"] = means["feat"]
        if self.nonfinite_total:
            record["skipped_nonfinite"] = self.nonfinite_total
        record.update(hooks.step_metrics())
        return record

    def _watch_spikes(self, step: int, loss: float) -> None:
        """Warn when the loss jumps far above its running mean (a spike often precedes divergence)."""
        factor = self.cfg.spike_warn_factor
        mean, n = self.loss_mean
        if factor > 0 and n >= 10 and loss > factor * mean:
            log.warning("step %d: loss %.4g is %.1fx its running mean %.4g (a spike: lower --lr if it repeats)",
                        step + 1, loss, loss / mean, mean)
        self.loss_mean = (loss if n == 0 else mean + 0.1 * (loss - mean), n + 1)

    # ------------------------------------------------------------------ the loop
    def run(self, on_step, on_eval=None) -> TrainResult:
        from tqdm.auto import tqdm

        cfg, env = self.cfg, self.env
        self.setup()
        if self.finished is not None:
            log.info("%s: the run is complete (step %d, --steps %d): nothing to do; pass a larger --steps to "
                     "continue it.", self.out, self.finished, cfg.steps)
            return TrainResult(self.out, self.out / "model", self.finished, False)
        start = self.state["step"]
        result = TrainResult(self.out, None, start, False)
        self.last_val = None
        bar = tqdm(total=cfg.steps, initial=start, disable=not (env.is_main and cfg.progress), unit="step",
                   dynamic_ncols=True, desc="train")
        tokens_per_step = self.global_batch * cfg.seq_len
        with _StopFlag() as stop:
            for step in range(start, cfg.steps):
                t0 = time.perf_counter()
                record = self.step(step)
                self.state["step"] = step + 1
                self.state["consumed"] += self.global_batch
                self.state["tokens"] += tokens_per_step
                dt = time.perf_counter() - t0
                record = {"step": step + 1, **record, "tokens": self.state["tokens"],
                          "tokens_per_s": tokens_per_step / dt,
                          "epoch": self.state["consumed"] / len(self.data.train_idx)}
                last = step + 1 == cfg.steps
                if (cfg.eval_every and (step + 1) % cfg.eval_every == 0) or last:
                    record["val_loss"] = self.last_val = evaluate(self.objective, self.data, cfg, env, self.bf16)
                    if on_eval is not None and env.is_main:
                        model = self.objective.model
                        was_training = model.training
                        model.eval()
                        with torch.no_grad():
                            record.update(on_eval(step + 1, model) or {})
                        model.train(was_training)
                result.losses[step + 1] = record["loss"]
                if (step + 1) % cfg.log_every == 0 or last or "val_loss" in record:
                    self.metrics.log(record)
                    if not cfg.progress and env.is_main:
                        log.info(" ".join(f"{k}={_fmt(v)}" for k, v in record.items()))
                bar.update(1)
                shown = {k: _fmt(v) for k, v in self.last_schedule.items() if v is not None}
                bar.set_postfix(loss=f"{record['loss']:.3f}", **shown, tok_s=f"{record['tokens_per_s']:.0f}",
                                refresh=False)
                if on_step is not None:
                    on_step(step + 1, record)
                stopping = env.any(stop.requested)
                bad = self.nonfinite_run
                if bad and bad > cfg.max_nonfinite_steps:
                    bar.close()
                    raise TrainingStopped(
                        f"the loss or gradient norm was not finite for {bad} consecutive steps ({step + 2 - bad}-"
                        f"{step + 1}); their updates were skipped and training stopped without a final model. Lower "
                        f"--lr (now {cfg.lr:g}), check the data, or raise --max-nonfinite-steps. The newest "
                        f"checkpoint in {self.out / 'checkpoints'} (if any) holds the last finite weights.")
                # a checkpoint every --save-every steps, at the last step (so --resume --steps N' continues from
                # the end) and on Ctrl-C
                if stopping or last or (cfg.save_every and (step + 1) % cfg.save_every == 0):
                    path = ckpt.save_checkpoint(self.out, self.objective, self.optimizer, self.scheduler,
                                                dict(self.state), env, cfg.keep_checkpoints)
                    if env.is_main:
                        bar.write(f"checkpoint: {path}")
                if stopping:
                    result.interrupted = True
                    break
        bar.close()
        result.step = self.state["step"]
        result.val_loss = self.last_val
        if not result.interrupted:
            result.model_dir = self.save_final()
        self.metrics.close()
        if env.is_main:
            png = plot_loss_curve(self.metrics.path, self.out / "loss_curve.png")
            if not result.interrupted:
                self.hooks.on_train_end(self.out, read_metrics(self.metrics.path))
            if result.interrupted:
                log.info("stopped at step %d: continue with the same command plus --resume", result.step)
            else:
                log.info("done: model in %s%s", result.model_dir, f", loss curve {png}" if png else "")
        return result

    def save_final(self) -> Path | None:
        """The trained model in upcycle.load format at OUT/model (rank 0 writes; all ranks gather)."""
        cfg, env = self.cfg, self.env
        model = self.objective.model
        if env.world > 1:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if not env.is_main:
                env.barrier()
                return None
            model, _ = build_student(cfg)
            model.load_state_dict(full)
            train_hooks(model, cfg).before_step(self.state["step"] - 1)  # schedules: pure functions of the step
        elif not env.is_main:
            return None
        if env.world > 1:  # a rebuilt model: the recipe's final touches run on what is saved
            train_hooks(model, cfg).finalize(model)
        else:
            self.hooks.finalize(model)
        if cfg.gradient_checkpointing:
            (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
        model.config.use_cache = True
        dtype = self.saved_dtype if cfg.save_dtype == "auto" else DTYPES[cfg.save_dtype]
        model.to(device="cpu", dtype=dtype).eval()
        bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            env.barrier()
            raise TrainingStopped(f"the trained weights are not finite ({len(bad)} tensors, e.g. {bad[0]}): no final "
                                  f"model was written. Lower --lr (now {cfg.lr:g}) and train again.")
        path = upcycle.save(model, self.out / "model", tokenizer=self.tokenizer)
        env.barrier()
        return path


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
