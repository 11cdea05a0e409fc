"""Student and teacher models for training: loading, on-the-fly conversion, attention / RoPE settings."""

from __future__ import annotations

import logging

import torch
from torch import nn

import upcycle
from upcycle.modules import BankSparseSwiGLU, sparse_ffns

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
    if cfg.max_position_embeddings:
        c.max_position_embeddings = cfg.max_position_embeddings
    if cfg.rope_theta or cfg.rope_scaling:
        params = dict(getattr(c, "rope_parameters", None) or {})
        if cfg.rope_theta:
            params["rope_theta"] = cfg.rope_theta
        if cfg.rope_scaling:
            params.update(cfg.rope_scaling)
        c.rope_parameters = params
    if cfg.rope_theta or cfg.rope_scaling or cfg.max_position_embeddings:
        decoder = model.get_decoder()
        old = decoder.rotary_emb
        device = next(old.buffers()).device if any(True for _ in old.buffers()) else None
        try:
            decoder.rotary_emb = type(old)(config=c).to(device)
        except Exception as e:
            settings = getattr(c, "rope_parameters", None)
            raise ValueError(f"RoPE settings {settings} rejected by transformers: {e}") from e
    limit = getattr(c, "max_position_embeddings", None)
    if limit and cfg.seq_len > limit:
        log.warning("seq_len %d exceeds max_position_embeddings %d: set --rope-scaling / --max-position-embeddings "
                    "for long context.", cfg.seq_len, limit)
    return model


def build_student(cfg) -> tuple[nn.Module, torch.dtype]:
    """(fp32 training model on CPU, dtype of the checkpoint on disk)."""
    model = upcycle.load(cfg.model)
    saved = floating_dtype(model)
    model.float()
    converted = any(True for _ in sparse_ffns(model))
    if cfg.bank_size is not None:
        if converted:
            m = next(m for _, m in sparse_ffns(model))
            if (m.bank_size, m.target_keep) != (cfg.bank_size, cfg.keep):
                raise ValueError(
                    f"{cfg.model} is already converted (bank_size={m.bank_size}, keep={m.target_keep}); drop "
                    "--bank-size/--keep or pass the dense checkpoint."
                )
        else:
            sparse = upcycle.BankSparseConfig(
                bank_size=cfg.bank_size, keep=cfg.keep, predictor_rank=cfg.predictor_rank,
                predictor_budget=cfg.predictor_budget, gate_mode=cfg.gate_mode, predictor_init="svd")
            upcycle.convert(model, sparse, progress=False)
    elif not converted:
        log.warning("%s is a dense model: training it densely (a matched-token dense control). Convert it first "
                    "(`upcycle convert`) or pass --bank-size/--keep to train a sparse one.", cfg.model)
    configure(model, cfg)
    if cfg.gradient_checkpointing:
        # transformers 5 renamed gradient_checkpointing_* to activation_checkpointing_*; 4.x has the old name
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train(), saved


def build_teacher(cfg, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The frozen dense teacher: --teacher, or --model loaded again and made dense (the dense parent at step 0)."""
    path = cfg.teacher or cfg.model
    teacher = upcycle.load(path)
    if any(True for _ in sparse_ffns(teacher)):
        upcycle.to_dense(teacher)
    configure(teacher, cfg)
    teacher.requires_grad_(False)
    return teacher.to(device=device, dtype=dtype).eval()


def module_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def ffn_parameter_names(model: nn.Module) -> set[str]:
    """Names of every FFN parameter (dense weights, predictor, gate scale) of sparse and dense SwiGLUs."""
    prefixes = [name + "." for name, m in model.named_modules()
                if isinstance(m, BankSparseSwiGLU) or all(hasattr(m, a) for a in ("gate_proj", "up_proj", "down_proj"))]
    return {n for n, _ in model.named_parameters() if any(n.startswith(p) for p in prefixes)}


def is_predictor_param(name: str) -> bool:
    return ".predictor." in name or name.endswith("gate_scale")
