"""Student and teacher models for training: loading, on-the-fly conversion, the recipe's hooks,
attention / RoPE settings."""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

import upcycle
from upcycle import hf
from upcycle.recipes import registry

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def floating_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def configure(model: nn.Module, cfg) -> nn.Module:
    """Attention kernel, RoPE / context-length overrides, no KV cache; shared by student and teacher."""
    try:
        model.set_attn_implementation(cfg.attn_implementation)
    except Exception as e:
        raise ValueError(f"--attn-implementation {cfg.attn_implementation}: {e}") from e
    c = model.config
    c.use_cache = False
    hf.set_rope(model, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings)
    limit = getattr(c, "max_position_embeddings", None)
    if limit and cfg.seq_len > limit:
        log.warning("seq_len %d exceeds max_position_embeddings %d: set --rope-scaling / --max-position-embeddings "
                    "for long context.", cfg.seq_len, limit)
    return model


def build_student(cfg) -> tuple[nn.Module, torch.dtype]:
    """(fp32 training model on CPU, dtype of the checkpoint on disk); a dense --model is converted on the fly
    when the recipe section holds conversion fields (e.g. --bank-size/--keep)."""
    model = upcycle.load(cfg.model)
    saved = floating_dtype(model)
    model.float()
    plan = cfg.resolve_recipe()
    recipe = registry.for_model(model)
    if plan.convert_config is not None:
        if recipe is not None:
            have = recipe.config_from_section(registry.metadata_of(model).section, cfg.model)
            given = {k: getattr(plan.convert_config, k) for k in cfg.recipe if hasattr(have, k)}
            diff = {k: (getattr(have, k), v) for k, v in given.items() if getattr(have, k) != v}
            if diff or recipe is not plan.recipe:
                saved_str = ", ".join(f"{k}={a}" for k, (a, _) in diff.items()) or recipe.name
                raise ValueError(f"{cfg.model} is already converted ({saved_str}); drop the conversion flags "
                                 f"({', '.join('--' + k.replace('_', '-') for k in diff or given)}) or pass the "
                                 "dense checkpoint.")
        else:
            upcycle.convert(model, plan.convert_config, progress=False)
            recipe = plan.recipe
    elif recipe is None:
        log.warning("%s is a dense model: training it densely (a matched-token dense control). Convert it first "
                    "(`upcycle convert`) or pass the recipe's conversion flags (e.g. --bank-size/--keep) to train a "
                    "sparse one.", cfg.model)
    elif plan.recipe is not None and plan.recipe is not recipe:
        raise ValueError(f"{cfg.model} was converted with recipe {recipe.name!r}, not {plan.recipe.name!r}: drop "
                         f"--recipe {plan.recipe.name} or pass a checkpoint of that recipe.")
    configure(model, cfg)
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    return model.train(), saved


def checkpoint_kwargs(model: nn.Module) -> dict:
    """torch.utils.checkpoint kwargs: non-reentrant, with the `context_fn` the model's modules declare (a module
    class attribute `checkpoint_context_fn`; bank-sparse: the recomputation replays the forward's routing)."""
    fns = []
    for m in model.modules():
        fn = getattr(type(m), "checkpoint_context_fn", None)
        if fn is not None and fn not in fns:
            fns.append(fn)
    kw: dict = {"use_reentrant": False}
    if len(fns) == 1:
        kw["context_fn"] = fns[0]
    elif fns:
        def context_fn():
            pairs = [fn() for fn in fns]
            return _all(p[0] for p in pairs), _all(p[1] for p in pairs)

        kw["context_fn"] = context_fn
    return kw


@contextlib.contextmanager
def _all(contexts):
    with contextlib.ExitStack() as stack:
        for c in contexts:
            stack.enter_context(c)
        yield


def enable_checkpointing(model: nn.Module) -> None:
    """Activation checkpointing of every decoder layer (see checkpoint_kwargs)."""
    kw = checkpoint_kwargs(model)
    # transformers 5 renamed gradient_checkpointing_* to activation_checkpointing_*; 4.x has the old name
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)


def train_hooks(model: nn.Module, cfg) -> registry.TrainHooks:
    """The hooks of the recipe `model` is converted with (a dense model: the no-op hooks)."""
    recipe = registry.for_model(model)
    options = cfg.resolve_recipe().options
    if recipe is None or recipe.train_hooks is None:
        if options is not None:
            log.warning("recipe options %s have no effect on a dense model", sorted(cfg.recipe))
        return registry.TrainHooks()
    hooks = recipe.train_hooks(model, options)
    hooks.total_steps = cfg.steps
    return hooks


def build_teacher(cfg, device: torch.device, dtype: torch.dtype) -> tuple[nn.Module, str]:
    """The frozen dense teacher and where it came from: --teacher; else the recipe's dense form of --model
    (bank-sparse: the same weights with dense FFNs, i.e. the dense parent at step 0); else the dense parent
    recorded in the checkpoint's metadata (`source`, written by `upcycle convert`)."""
    path = cfg.teacher or cfg.model
    teacher = upcycle.load(path)
    where = str(path)
    recipe = registry.for_model(teacher)
    if recipe is not None:
        if recipe.to_dense is not None:
            recipe.to_dense(teacher)
            where = f"{path} (made dense)"
        else:
            source = registry.metadata_of(teacher).extra.get("source")
            if cfg.teacher or not source:
                raise ValueError(f"{path} ({recipe.name}) has no dense form and records no dense parent: pass "
                                 "--teacher DENSE_DIR.")
            teacher, where = upcycle.load(source), f"{source} (the parent recorded in {path})"
            if registry.for_model(teacher) is not None:
                raise ValueError(f"the recorded parent {source} is not a dense checkpoint: pass --teacher DENSE_DIR.")
    configure(teacher, cfg)
    teacher.requires_grad_(False)
    return teacher.to(device=device, dtype=dtype).eval(), where


def module_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def ffn_parameter_names(model: nn.Module) -> set[str]:
    """Names of every FFN parameter (dense weights and any routing parameters under the FFN module)."""
    prefixes = [name + "." for name, _, _ in hf.glu_modules(model)]
    return {n for n, _ in model.named_parameters() if any(n.startswith(p) for p in prefixes)}
