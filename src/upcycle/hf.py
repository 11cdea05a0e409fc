"""The one structural matcher of Hugging Face decoder models: decoder layers, SwiGLU FFNs, layer indices.

Recipes find what to convert here and the trainer / evaluator find what to shard or measure here, so
"what counts as a SwiGLU FFN" is decided in one place: a module with `gate_proj`, `up_proj` and
`down_proj` nn.Linear children (the names of Llama, Qwen2/2.5/3, Mistral) and a SiLU `act_fn`.
"""

from __future__ import annotations

import re

from torch import nn

SUPPORTED = "Llama, Qwen2/Qwen2.5, Qwen3, Mistral and other models whose FFN is SwiGLU"
GLU_LINEARS = ("gate_proj", "up_proj", "down_proj")


def is_silu(act: nn.Module | None) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ in ("SiLU", "SiLUActivation")


def has_glu_linears(m: nn.Module) -> bool:
    return all(isinstance(getattr(m, n, None), nn.Linear) for n in GLU_LINEARS)


def layer_index(name: str, fallback: int) -> int:
    """The decoder-layer index in a qualified module name (`model.layers.7.mlp` -> 7)."""
    numbers = re.findall(r"\.(\d+)\.", f".{name}.")
    return int(numbers[-1]) if numbers else fallback


def glu_modules(model: nn.Module) -> list[tuple[str, int, nn.Module]]:
    """(name, layer index, module) of every module holding gate/up/down linears, dense or converted, in order."""
    found = []
    for name, m in model.named_modules():
        if has_glu_linears(m):
            found.append((name, layer_index(name, len(found)), m))
    return found


def swiglu_ffns(model: nn.Module, skip: tuple[type, ...] = ()) -> list[tuple[str, int, nn.Module]]:
    """(name, layer index, module) of every SwiGLU FFN (SiLU act_fn), skipping modules of the `skip` types.

    ValueError naming the problem when there is none: gated but not SiLU, or no gated FFN at all.
    """
    found, non_silu = [], []
    for name, idx, m in glu_modules(model):
        if isinstance(m, skip):
            continue
        if is_silu(getattr(m, "act_fn", None)):
            found.append((name, idx, m))
        else:
            non_silu.append((name, type(getattr(m, "act_fn", None)).__name__))
    if found:
        return found
    arch = type(model).__name__
    if non_silu:
        raise ValueError(
            f"{arch}: FFN {non_silu[0][0]} is gated but its activation is {non_silu[0][1]}, not SiLU. "
            f"upcycle supports SwiGLU FFNs ({SUPPORTED})."
        )
    raise ValueError(
        f"{arch} has no SwiGLU FFN (modules with gate_proj, up_proj, down_proj and a SiLU act_fn). "
        f"Unsupported architecture: upcycle supports {SUPPORTED}."
    )


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks (Llama/Qwen2/Mistral keep them in `model.model.layers`)."""
    layers = getattr(model.get_decoder(), "layers", None) if hasattr(model, "get_decoder") else None
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__}: no decoder `layers` ModuleList (an HF causal LM was expected).")
    return list(layers)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the submodule `name` was."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def mlp_tensors(shapes: dict[str, tuple[tuple[int, ...], int]]) -> dict[int, dict[str, list]]:
    """Checkpoint tensors under each decoder layer's `mlp`: {layer: {first child name: [(shape, bytes/elem)]}},
    from `name -> (shape, bytes per element)` (safetensors headers: no weights are loaded)."""
    out: dict[int, dict[str, list]] = {}
    for name, (shape, nbytes) in shapes.items():
        m = re.search(r"\.(\d+)\.mlp\.([A-Za-z_]\w*)\.", name)
        if m:
            out.setdefault(int(m.group(1)), {}).setdefault(m.group(2), []).append((shape, nbytes))
    return out


def set_rope(model: nn.Module, rope_theta: float | None = None, rope_scaling: dict | None = None,
             max_position_embeddings: int | None = None) -> nn.Module:
    """Override the RoPE base / scaling (YaRN, linear, dynamic, ...) and the position limit of an HF causal LM
    in place, rebuilding its rotary embedding; ValueError when transformers rejects the settings."""
    if not (rope_theta or rope_scaling or max_position_embeddings):
        return model
    c = model.config
    if max_position_embeddings:
        c.max_position_embeddings = max_position_embeddings
    if rope_theta or rope_scaling:
        params = dict(getattr(c, "rope_parameters", None) or {})
        if rope_theta:
            params["rope_theta"] = rope_theta
        if rope_scaling:
            params.update(rope_scaling)
        c.rope_parameters = params
    decoder = model.get_decoder()
    old = decoder.rotary_emb
    device = next(old.buffers()).device if any(True for _ in old.buffers()) else None
    try:
        decoder.rotary_emb = type(old)(config=c).to(device)
    except Exception as e:
        raise ValueError(f"RoPE settings {getattr(c, 'rope_parameters', None)} rejected by transformers: {e}") from e
    return model
