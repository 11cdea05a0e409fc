"""Export an MoE-upcycled Llama / Mistral / Qwen2 model as a native transformers MoE checkpoint (no remote code).

`export_hf(model, target)` returns a target config and a state dict in the target's *in-memory* layout
(`mlp.gate.weight`, `mlp.experts.gate_up_proj` [E, 2f, d], `mlp.experts.down_proj` [E, d, f]): what
`MixtralForCausalLM(config).load_state_dict(sd, strict=True)` accepts. `save_native` writes a directory with
`save_pretrained`; transformers 5 converts the fused tensors back to per-expert checkpoint keys on save
(Mixtral: `block_sparse_moe.experts.{e}.w1/w2/w3`; Qwen2-MoE: `mlp.experts.{e}.gate_proj/up_proj/down_proj`).

- mixtral:   Llama / Mistral parents (bias-free Qwen2 too), every layer MoE, normalised top-k, no shared expert.
- qwen2_moe: any supported parent. The shared experts are fused into its one `shared_expert` with
  `shared_expert_gate = 0` and `down_proj * 2`, so sigmoid(0) = 0.5 leaves it exactly always on; Llama /
  Mistral parents get zero q/k/v biases; dense layers go to `mlp_only_layers`.
- hf:        Mixtral for Llama / Mistral parents without shared experts (when it can represent the model),
  else Qwen2-MoE.

Settings a target cannot represent raise ValueError naming the target that would work.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from upcycle import hf, hf_models
from upcycle.fsutil import atomic_directory, check_output
from upcycle.recipes.moe.modules import MoESwiGLU

log = logging.getLogger(__name__)

PARENTS = ("llama", "mistral", "qwen2")
TARGETS = ("mixtral", "qwen2_moe")
_COMMON = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
           "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps", "tie_word_embeddings",
           "rope_parameters", "attention_dropout", "bos_token_id", "eos_token_id", "pad_token_id")


def _target_class(target: str):
    from transformers import MixtralForCausalLM, Qwen2MoeForCausalLM

    return {"mixtral": MixtralForCausalLM, "qwen2_moe": Qwen2MoeForCausalLM}[target]


def _nonzero(t: torch.Tensor | None) -> bool:
    return t is not None and bool(t.detach().abs().max() > 0)


def _attn_bias(blocks: list[nn.Module], names: tuple[str, ...]) -> bool:
    return any(_nonzero(getattr(getattr(b.self_attn, n), "bias", None)) for b in blocks for n in names)


def parent_type(model: nn.Module) -> str:
    return hf_models.base_model_type(getattr(model.config, "model_type", "") or "")


def _moe_setup(model: nn.Module) -> tuple[dict[int, MoESwiGLU], object, int]:
    blocks = hf.decoder_layers(model)
    layers = {i: b.mlp for i, b in enumerate(blocks) if isinstance(getattr(b, "mlp", None), MoESwiGLU)}
    if not layers:
        raise ValueError("the model has no MoE layers: convert it with upcycle.convert(model, MoEUpcycleConfig()) "
                         "first.")
    first = next(iter(layers.values()))
    for i, m in layers.items():
        if m.config != first.config or m.expert_size != first.expert_size:
            raise ValueError(f"layer {i} has a different MoE config: HF MoE classes need one config for all layers.")
    return layers, first.config, first.expert_size


def representable(model: nn.Module, target: str) -> str | None:
    """None when `target` can represent `model` exactly, else the reason (a sentence naming the fix)."""
    try:
        _check(model, target)
    except ValueError as e:
        return str(e)
    return None


def _check(model: nn.Module, target: str) -> None:
    pc = model.config
    if target not in TARGETS:
        raise ValueError(f"export target {target!r} is not one of {', '.join(TARGETS)} (or 'hf': the right one).")
    moe, cfg, _ = _moe_setup(model)
    blocks = hf.decoder_layers(model)
    dense_layers = [i for i in range(len(blocks)) if i not in moe]
    ptype = parent_type(model)
    if ptype not in PARENTS:
        raise ValueError(f"parent model_type={ptype!r} cannot be exported: supported parents are {', '.join(PARENTS)}.")
    if _attn_bias(blocks, ("o_proj",)):
        raise ValueError("attention o_proj has a bias, which neither Mixtral nor Qwen2-MoE represent.")
    for i in dense_layers:
        if any(getattr(blocks[i].mlp, n).bias is not None for n in hf.GLU_LINEARS):
            raise ValueError(f"dense layer {i}'s MLP has biases (mlp_bias=True), which Qwen2-MoE cannot represent.")
    if target == "mixtral":
        hint = ": export with --to qwen2_moe (target 'qwen2_moe') instead, or --to hf to pick it."
        if cfg.shared_experts:
            raise ValueError(f"Mixtral has no shared expert but shared_experts={cfg.shared_experts}" + hint)
        if not cfg.normalised:
            raise ValueError("Mixtral always renormalises the top-k weights but the model routes with "
                             "router='softmax_topk', norm_topk_prob=False" + hint)
        if dense_layers:
            raise ValueError(f"Mixtral makes every layer MoE but layers {dense_layers} are dense" + hint)
        if _attn_bias(blocks, ("q_proj", "k_proj", "v_proj")):
            raise ValueError("Mixtral attention has no q/k/v bias but the parent's are non-zero" + hint)
        if ptype == "qwen2" and "sliding_attention" in (getattr(pc, "layer_types", None) or []):
            raise ValueError("Mixtral cannot express Qwen2's per-layer sliding window" + hint)


def choose_target(model: nn.Module) -> str:
    """'hf': Mixtral for Llama / Mistral parents when it represents the model, else Qwen2-MoE."""
    if parent_type(model) in ("llama", "mistral") and representable(model, "mixtral") is None:
        return "mixtral"
    return "qwen2_moe"


def _base_kwargs(pc) -> dict:
    kw = {k: getattr(pc, k) for k in _COMMON if hasattr(pc, k)}
    head_dim = getattr(pc, "head_dim", None)
    if head_dim is not None and head_dim != pc.hidden_size // pc.num_attention_heads:
        kw["head_dim"] = head_dim
    kw["dtype"] = getattr(pc, "dtype", None) or torch.float32
    return kw


def _target_config(model: nn.Module, target: str, cfg, f: int, dense_layers: list[int]):
    from transformers import MixtralConfig, Qwen2MoeConfig

    pc = model.config
    ptype = parent_type(model)
    kw = _base_kwargs(pc)
    common = {"num_experts_per_tok": cfg.top_k, "router_aux_loss_coef": cfg.aux_loss_coef}
    if target == "mixtral":
        sliding = getattr(pc, "sliding_window", None) if ptype == "mistral" else None
        # jitter off: Mixtral's jitter also perturbs the expert inputs, upcycle's only the router's
        return MixtralConfig(**kw, **common, num_local_experts=cfg.num_experts, intermediate_size=f,
                             sliding_window=sliding, router_jitter_noise=0.0)
    n = pc.num_hidden_layers
    if ptype == "qwen2":
        win = {k: getattr(pc, k) for k in ("use_sliding_window", "sliding_window", "max_window_layers", "layer_types")}
    elif ptype == "mistral" and getattr(pc, "sliding_window", None):
        win = {"use_sliding_window": True, "sliding_window": pc.sliding_window, "max_window_layers": n,
               "layer_types": ["sliding_attention"] * n}
    else:
        win = {"use_sliding_window": False, "layer_types": ["full_attention"] * n}
    return Qwen2MoeConfig(**kw, **common, **win, num_experts=cfg.num_experts, moe_intermediate_size=f,
                          shared_expert_intermediate_size=cfg.shared_experts * f,
                          intermediate_size=pc.intermediate_size,
                          norm_topk_prob=cfg.normalised, decoder_sparse_step=1, mlp_only_layers=dense_layers,
                          qkv_bias=True)


def _state_dict(model: nn.Module, target: str, moe: dict) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    for key, t in model.state_dict().items():
        qkv_bias = key.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias"))
        if key.endswith("self_attn.o_proj.bias") or (target == "mixtral" and qkv_bias):
            continue  # checked to be zero
        if ".mlp.shared_expert.down_proj" in key:
            t = t * 2.0  # sigmoid(0) = 0.5 from the zero shared_expert_gate
        sd[key] = t.detach().clone()
    if target == "qwen2_moe":
        for i, b in enumerate(hf.decoder_layers(model)):
            for n in ("q_proj", "k_proj", "v_proj"):  # Qwen2-MoE always has q/k/v biases; zero = Llama/Mistral
                lin = getattr(b.self_attn, n)
                sd.setdefault(f"model.layers.{i}.self_attn.{n}.bias",
                              torch.zeros(lin.out_features, dtype=lin.weight.dtype))
            if i in moe:
                m, p = moe[i], f"model.layers.{i}.mlp."
                dt, d = m.gate.weight.dtype, m.hidden_size
                sd[p + "shared_expert_gate.weight"] = torch.zeros(1, d, dtype=dt)
                if m.shared_expert is None:  # Qwen2-MoE always builds a shared expert; size 0 = absent
                    sd[p + "shared_expert.gate_proj.weight"] = torch.zeros(0, d, dtype=dt)
                    sd[p + "shared_expert.up_proj.weight"] = torch.zeros(0, d, dtype=dt)
                    sd[p + "shared_expert.down_proj.weight"] = torch.zeros(d, 0, dtype=dt)
    return sd


def _build(target: str, config, sd: dict[str, torch.Tensor]) -> nn.Module:
    """The target class on the meta device with the tensors assigned (strict key and shape check)."""
    with torch.device("meta"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")  # a size-0 shared expert
        m = _target_class(target)(config)
    want = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in sd.items()}
    if want != have:
        missing, extra = sorted(set(want) - set(have))[:5], sorted(set(have) - set(want))[:5]
        shapes = [k for k in want.keys() & have.keys() if want[k] != have[k]][:5]
        raise RuntimeError(f"export bug: missing {missing}, unexpected {extra}, shape mismatch {shapes}")
    m.load_state_dict(sd, strict=True, assign=True)
    if config.tie_word_embeddings:
        m.tie_weights()
    return m.eval()


def export_hf(model: nn.Module, target: str = "hf"):
    """(native config, state dict) of MixtralForCausalLM or Qwen2MoeForCausalLM ('hf': the right one)."""
    if target == "hf":
        target = choose_target(model)
    _check(model, target)
    moe, cfg, f = _moe_setup(model)
    dense_layers = [i for i in range(len(hf.decoder_layers(model))) if i not in moe]
    config = _target_config(model, target, cfg, f, dense_layers)
    sd = _state_dict(model, target, moe)
    _build(target, config, sd)  # validates keys and shapes
    return config, sd


def native_model(model: nn.Module, target: str = "hf") -> nn.Module:
    """The native transformers model (MixtralForCausalLM / Qwen2MoeForCausalLM) holding copies of the weights."""
    if target == "hf":
        target = choose_target(model)
    config, sd = export_hf(model, target)
    native = _build(target, config, sd)
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        native.generation_config = gen
    return native


def save_native(model: nn.Module, out: str | os.PathLike, tokenizer=None, target: str = "hf") -> Path:
    """Write the native checkpoint (safetensors, config, tokenizer) to `out` atomically; other files kept."""
    name = choose_target(model) if target == "hf" else target
    native = native_model(model, name)
    log.info("exporting as %s (%s)", type(native).__name__, name)

    def write(tmp: Path) -> None:
        native.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    return atomic_directory(Path(out), write, keep_others=True)


def export(model: nn.Module, out: str | os.PathLike, target: str = "hf", tokenizer=None,
           overwrite: bool = False) -> Path:
    """Python API of `upcycle export --to TARGET`: refuses an output holding other files unless `overwrite`."""
    check_output(out, overwrite=overwrite)
    return save_native(model, out, tokenizer, target)


def exporter(target: str):
    """The `Recipe.exporters` entry for `target`: (model, out, tokenizer) -> Path."""
    return lambda model, out, tokenizer=None: save_native(model, out, tokenizer, target)
