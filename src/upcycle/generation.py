"""`upcycle.generate`: low-overhead batch-1 / small-batch text generation on CPU, gpt-fast style.

A decode step is memory-bound (every weight is streamed once per token), and eager `model.generate` adds
several ms per token of mask building, cache bookkeeping, logits processors and dispatch on a 30-layer model,
plus 1-row GEMMs that stream weights slower than GEMV. This path keeps a preallocated (static) KV cache and
walks the model's decoder layers itself:

* the model's own modules do the work: embeddings, q/k/v/o projections, Qwen3 q/k norms and each layer's
  `mlp`, called as is, so a bank-sparse FFN runs its own decode kernels and an int8 linear (`upcycle.quantize`)
  its own GEMV;
* RoPE cos/sin come from the model's `rotary_emb`, computed once for every position of the run;
* attention is one `scaled_dot_product_attention` over a slice of the static cache, with no mask unless a
  sliding window or the compiled (fixed-shape) step needs one;
* single-row `nn.Linear` projections use GEMV (`torch.mv`), HF's float32 RMSNorms the fused `F.rms_norm`;
  both are bit-identical to the modules' own forward;
* sampling, EOS / stop-string checks and streaming are a few tensor ops, not a logits-processor pipeline;
* optionally (`compile=True`) the decode step is captured once by `torch.compile` and replayed.

Greedy output is token-identical to `model.generate(do_sample=False)` in float32 (tested for dense and
bank-sparse models). Supported model types: llama, mistral, qwen2, qwen3 (and their upcycle_ classes);
unpadded batches (every prompt of a batch has the same length); CPU.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SUPPORTED_MODEL_TYPES", "Decoder", "TextStream", "generate", "get_decoder"]

# Model types whose decoder layer is exactly pre-norm attention + pre-norm MLP with these module names. Others with
# the same attribute names differ in ways a name check cannot see (Gemma's extra norms and embedding scale,
# Granite's multipliers, SmolLM3's NoPE layers), so they are refused rather than decoded wrongly.
SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})
# RMSNorm classes whose forward is exactly pow(2).mean().rsqrt() * weight in float32, i.e. what F.rms_norm computes.
_HF_RMSNORMS = frozenset({"LlamaRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "MistralRMSNorm"})
_UPCYCLE_PREFIX = "upcycle_"  # hf_models.PREFIX: converted models are re-classed to upcycle_<type>


def _base_type(model: nn.Module) -> str | None:
    mt = getattr(model.config, "model_type", None)
    return mt[len(_UPCYCLE_PREFIX):] if isinstance(mt, str) and mt.startswith(_UPCYCLE_PREFIX) else mt


@dataclass
class _Layer:
    """One decoder layer's submodules, looked up once instead of per token."""

    input_norm: nn.Module
    q_proj: nn.Module
    k_proj: nn.Module
    v_proj: nn.Module
    o_proj: nn.Module
    q_norm: nn.Module | None
    k_norm: nn.Module | None
    post_norm: nn.Module
    mlp: nn.Module
    window: int | None  # sliding-window length; None = full attention


def _layer_window(layer: nn.Module, config, base_type: str | None) -> int | None:
    """The sliding window HF applies in this layer (Qwen2/3 store it per attention module, Mistral in the config)."""
    if hasattr(layer.self_attn, "sliding_window"):
        return layer.self_attn.sliding_window
    return getattr(config, "sliding_window", None) if base_type == "mistral" else None


def _norm(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply an RMSNorm module; HF's float32 RMSNorms go through fused `F.rms_norm` (same ops, ~40% less time)."""
    if type(mod).__name__ in _HF_RMSNORMS and x.dtype == torch.float32 and mod.weight.dtype == torch.float32:
        return F.rms_norm(x, mod.weight.shape, mod.weight, mod.variance_epsilon)
    return mod(x)


def _linear(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply a projection; a plain `nn.Linear` on a single row goes through `torch.mv` / `addmv`.

    For one token `F.linear` runs a 1-row GEMM that streams the weight ~10-30% slower than MKL's GEMV, with
    more dispatch; the result is bit-identical. Other modules (int8, sparse) are called as is, and so is
    everything under `torch.compile`, whose own lowering of `mv` is slower than the GEMM it calls out to.
    """
    if type(mod) is nn.Linear and x.numel() == x.shape[-1] and not torch.compiler.is_compiling():
        flat = x.reshape(-1)
        y = torch.mv(mod.weight, flat) if mod.bias is None else torch.addmv(mod.bias, mod.weight, flat)
        return y.view(*x.shape[:-1], -1)
    return mod(x)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, half: int) -> torch.Tensor:
    """RoPE on [B, S, H, D]; `sin` has its first half negated so `roll` replaces HF's rotate_half exactly."""
    return x * cos + torch.roll(x, half, -1) * sin


class Decoder:
    """Static KV cache, RoPE table and module references for one model, batch size and maximum length.

    `forward(ids, pos)` runs tokens through every layer and returns last-position logits. With an `int` position
    it is the eager path (prefill or decode, attention over exactly the cached prefix). With a 1-element tensor
    position it is a fixed-shape single-token step (attention over the whole cache under a mask) that
    `torch.compile` captures once and replays for every position: `compiled_step`.
    """

    def __init__(self, model: nn.Module, batch_size: int, max_seq_len: int) -> None:
        cfg = model.config
        base_type = _base_type(model)
        if base_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"upcycle.generate supports model types {sorted(SUPPORTED_MODEL_TYPES)}, not "
                             f"{getattr(cfg, 'model_type', None)!r}: use model.generate for it.")
        base = model.model
        self.embed, self.norm, self.lm_head = base.embed_tokens, base.norm, model.lm_head
        self.layers = self._collect_layers(model, base_type)
        attn0 = base.layers[0].self_attn
        self.head_dim: int = attn0.head_dim
        self.n_heads: int = cfg.num_attention_heads
        self.n_kv: int = cfg.num_key_value_heads
        self.scaling: float = attn0.scaling
        self.batch_size = batch_size
        self.max_seq_len = max_seq_len
        dtype = base.embed_tokens.weight.dtype
        # Zeros, not empty: the fixed-shape step reads unwritten slots under a mask, and 0 * NaN would poison it.
        shape = (batch_size, self.n_kv, max_seq_len, self.head_dim)
        self.k_cache = [torch.zeros(shape, dtype=dtype) for _ in self.layers]
        self.v_cache = [torch.zeros(shape, dtype=dtype) for _ in self.layers]
        rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
        rope_type = str(rope.get("rope_type", rope.get("type", "")))
        if "dynamic" in rope_type or "longrope" in rope_type:
            raise ValueError(f"{rope_type} RoPE depends on the running length; a static RoPE table cannot reproduce "
                             "it: use model.generate for this model.")
        # The HF rotary module is elementwise per position, so one call for all positions equals per-step calls.
        cos, sin = base.rotary_emb(torch.empty(0, dtype=dtype), torch.arange(max_seq_len)[None])
        self.half = self.head_dim // 2
        self.cos = cos[0, :, None, :].contiguous()  # [L, 1, D]: broadcasts over [B, S, H, D]
        sin = sin[0, :, None, :].clone()
        sin[..., : self.half] = -sin[..., : self.half]  # -x2 * s == x2 * -s exactly
        self.sin = sin
        self.windows = {layer.window for layer in self.layers}
        self._compiled: dict[str | None, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {}
        self._signature = self._module_ids(model)

    @staticmethod
    def _collect_layers(model: nn.Module, base_type: str | None) -> list[_Layer]:
        base, cfg = model.model, model.config
        layers = []
        for layer in base.layers[: cfg.num_hidden_layers]:
            attn = getattr(layer, "self_attn", None)
            needed = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
            needed += [getattr(layer, n, None) for n in ("input_layernorm", "post_attention_layernorm", "mlp")]
            if any(m is None for m in needed):
                raise ValueError(f"unsupported decoder layer {type(layer).__name__}: upcycle.generate needs "
                                 "Llama-style submodules; use model.generate for this model.")
            q, k, v, o, n1, n2, mlp = needed
            window = _layer_window(layer, cfg, base_type)
            layers.append(
                _Layer(n1, q, k, v, o, getattr(attn, "q_norm", None), getattr(attn, "k_norm", None), n2, mlp, window)
            )
        return layers

    @staticmethod
    def _module_ids(model: nn.Module) -> tuple[int, ...]:
        """Identity of every module the decoder calls, to notice when the model was edited (e.g. FFNs swapped)."""
        base = model.model
        ids = [id(base.embed_tokens), id(base.norm), id(model.lm_head)]
        for layer in base.layers:
            a = layer.self_attn
            ids += [id(layer.mlp), id(layer.input_layernorm), id(layer.post_attention_layernorm)]
            ids += [id(a.q_proj), id(a.k_proj), id(a.v_proj), id(a.o_proj)]
            ids += [id(getattr(a, "q_norm", None)), id(getattr(a, "k_norm", None))]
        return tuple(ids)

    def matches(self, model: nn.Module, batch_size: int, length: int) -> bool:
        """True when this decoder can serve `model` at that batch size and total length without rebuilding."""
        ok = self.batch_size == batch_size and self.max_seq_len >= length
        return ok and self._signature == self._module_ids(model)

    def _spans(self, pos: int | torch.Tensor, s: int) -> dict[int | None, tuple[int, int, torch.Tensor | None]]:
        """Per window size: (first key, end key, attention mask or None), computed once per forward."""
        spans: dict[int | None, tuple[int, int, torch.Tensor | None]] = {}
        for w in self.windows:
            if isinstance(pos, torch.Tensor):  # fixed-shape single-token step: whole cache, mask the future
                kj = torch.arange(self.max_seq_len)
                mask = kj <= pos
                if w is not None:
                    mask = mask & (kj > pos - w)
                spans[w] = (0, self.max_seq_len, mask.view(1, 1, 1, -1))
            elif s == 1:
                end = pos + 1
                spans[w] = (0 if w is None else max(0, end - w), end, None)
            else:
                end = pos + s
                mask = None
                if pos > 0 or (w is not None and end > w):
                    qi, kj = torch.arange(pos, end)[:, None], torch.arange(end)[None, :]
                    mask = kj <= qi
                    if w is not None:
                        mask = mask & (kj > qi - w)  # HF: a query sees itself and the w - 1 tokens before it
                spans[w] = (0, end, mask)
        return spans

    def forward(self, ids: torch.Tensor, pos: int | torch.Tensor) -> torch.Tensor:
        """Run `ids` [B, S] at positions pos..pos+S-1; return float32 logits of the last position, [B, V]."""
        bsz, s = ids.shape
        nh, nkv, hd, half = self.n_heads, self.n_kv, self.head_dim, self.half
        static = isinstance(pos, torch.Tensor)
        if static:
            cos, sin = self.cos.index_select(0, pos), self.sin.index_select(0, pos)
        else:
            cos, sin = self.cos[pos : pos + s], self.sin[pos : pos + s]
        spans = self._spans(pos, s)
        x = self.embed(ids)
        for i, layer in enumerate(self.layers):
            h = _norm(layer.input_norm, x)
            q = _linear(layer.q_proj, h).view(bsz, s, nh, hd)
            k = _linear(layer.k_proj, h).view(bsz, s, nkv, hd)
            v = _linear(layer.v_proj, h).view(bsz, s, nkv, hd).transpose(1, 2)
            if layer.q_norm is not None:
                q, k = _norm(layer.q_norm, q), _norm(layer.k_norm, k)
            q = _rope(q, cos, sin, half).transpose(1, 2)
            k = _rope(k, cos, sin, half).transpose(1, 2)
            kc, vc = self.k_cache[i], self.v_cache[i]
            if static:
                kc.index_copy_(2, pos, k)
                vc.index_copy_(2, pos, v)
            else:
                kc.narrow(2, pos, s).copy_(k)
                vc.narrow(2, pos, s).copy_(v)
            start, end, mask = spans[layer.window]
            o = F.scaled_dot_product_attention(
                q,
                kc.narrow(2, start, end - start),
                vc.narrow(2, start, end - start),
                attn_mask=mask,
                is_causal=mask is None and s > 1,
                scale=self.scaling,
                enable_gqa=nkv != nh,
            )
            x = x + _linear(layer.o_proj, o.transpose(1, 2).reshape(bsz, s, nh * hd))
            x = x + layer.mlp(_norm(layer.post_norm, x))
        return _linear(self.lm_head, _norm(self.norm, x[:, -1:]))[:, -1].float()

    def compiled_step(self, mode: str | None = None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """`torch.compile` of the fixed-shape decode step (compiled on first call, then replayed).

        Not `fullgraph`: an FFN that dynamo cannot trace becomes a graph break and runs eagerly; one registered
        with `torch.library.custom_op` (the bank-sparse CPU kernel) stays inside the graph as an opaque call.
        """
        if mode not in self._compiled:
            self._compiled[mode] = torch.compile(self.forward, mode=mode, dynamic=False)
        return self._compiled[mode]


def _sample(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
            gen: torch.Generator | None) -> torch.Tensor:
    """Next token per row of float32 `logits` [B, V]; greedy when `temperature` <= 0.

    Same order as HF's warpers: temperature, top-k, then top-p (the smallest set of most likely tokens whose mass
    reaches `top_p`; never empty). With top-k the nucleus is taken among the k candidates only.
    """
    if temperature <= 0.0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        vals, idx = torch.topk(logits, top_k, dim=-1)  # sorted, descending
    elif top_p is not None and top_p < 1.0:
        vals, idx = torch.sort(logits, dim=-1, descending=True)
    else:
        return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=gen)[:, 0]
    probs = torch.softmax(vals, dim=-1)
    if top_p is not None and top_p < 1.0:
        mass_before = probs.cumsum(-1) - probs  # probability of the strictly more likely candidates
        probs = probs.masked_fill(mass_before >= top_p, 0.0)  # the most likely token always survives
    return idx.gather(-1, torch.multinomial(probs, 1, generator=gen))[:, 0]


class _StopStrings:
    """Finds stop strings in each row's generated text, decoding only a tail of it (not quadratic).

    A stop string of L characters ends inside the last L + 8 tokens unless more than 8 of them decode to nothing
    (only inside long multi-byte sequences): the documented limitation.
    """

    def __init__(self, stops: Sequence[str], tokenizer) -> None:
        if tokenizer is None:
            raise ValueError("stop_strings needs a tokenizer (generate(..., tokenizer=tok)).")
        self.stops = [s for s in stops if s]
        self.tokenizer = tokenizer
        self.window = max((len(s) for s in self.stops), default=0) + 8

    def hit(self, generated: list[int]) -> bool:
        text = self.tokenizer.decode(generated[-self.window :], skip_special_tokens=False)
        return any(s in text for s in self.stops)


class TextStream:
    """A `stream` callback that writes the generated text of row 0 as it comes (e.g. to stdout).

    Tokens are decoded from the last line break on, and text is held back while it ends in an incomplete
    multi-byte character, so what is written is exactly `tokenizer.decode(generated)`.
    """

    def __init__(self, tokenizer, write: Callable[[str], object], skip_special_tokens: bool = True) -> None:
        self.tokenizer, self.write, self.skip = tokenizer, write, skip_special_tokens
        self.ids: list[int] = []
        self.written = 0  # characters of decode(self.ids) already written

    def __call__(self, tokens: torch.Tensor) -> None:
        self.ids.append(int(tokens.reshape(-1)[0]))
        text = self.tokenizer.decode(self.ids, skip_special_tokens=self.skip)
        if text.endswith("\ufffd"):
            return  # an incomplete UTF-8 sequence: wait for its next byte
        self.write(text[self.written :])
        if text.endswith("\n"):
            self.ids, self.written = [], 0
        else:
            self.written = len(text)

    def flush(self) -> None:
        if self.ids:
            text = self.tokenizer.decode(self.ids, skip_special_tokens=self.skip)
            self.write(text[self.written :])
            self.ids, self.written = [], 0


_DECODERS: weakref.WeakKeyDictionary[nn.Module, Decoder] = weakref.WeakKeyDictionary()


def get_decoder(model: nn.Module, batch_size: int, length: int) -> Decoder:
    """The model's cached `Decoder` if it still fits (same modules, batch, enough length), else a new one.

    Allocating the KV cache and RoPE table, and above all compiling the step, should happen once per model,
    not per call. Lengths are rounded up to a multiple of 256 so that similar calls share one decoder.
    """
    dec = _DECODERS.get(model)
    if dec is None or not dec.matches(model, batch_size, length):
        dec = Decoder(model, batch_size, -(-length // 256) * 256)
        _DECODERS[model] = dec
    return dec


def _special_ids(model: nn.Module, eos: int | Sequence[int] | None, pad: int | None) -> tuple[list[int], int]:
    """EOS ids and pad id as HF resolves them: explicit arguments, else the generation config; `eos=[]` disables."""
    gen_cfg = getattr(model, "generation_config", None)
    if eos is None:
        eos = getattr(gen_cfg, "eos_token_id", None)
    eos_ids = [] if eos is None else [int(eos)] if isinstance(eos, int) else [int(e) for e in eos]
    if pad is None:
        pad = getattr(gen_cfg, "pad_token_id", None)
    if pad is None:
        pad = eos_ids[0] if eos_ids else 0
    return eos_ids, int(pad)


def _kernels_lead(model: nn.Module) -> bool:
    """Whether upcycle's CPU kernels, not torch's, carry most of a decode step: a quantised model, or one with
    bank-sparse FFNs (duck-typed, as bank_sparse.runtime finds them)."""
    if getattr(model, "upcycle_quantized", None):
        return True
    if model.get_input_embeddings().weight.dtype != torch.float32:
        return False  # bf16 attention GEMVs: torch at 1 thread lost 14% on an EPYC, gained 12% on a Xeon; left as is
    return any(getattr(m, "sparse_decode", False) for m in model.modules())


def _prepare_for_compile(model: nn.Module) -> None:
    """Build the sparse FFNs' decode caches now: a compiled graph cannot build them (see bank_sparse.runtime)."""
    if any(getattr(m, "sparse_decode", False) for m in model.modules()):
        from upcycle.recipes.bank_sparse import runtime

        runtime.prepare(model)


def generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int = 64,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_strings: Sequence[str] | None = None,
    tokenizer=None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    stream: Callable[[torch.Tensor], object] | None = None,
    compile: bool | str = False,
    seed: int | None = None,
    inference_mode: bool = False,
    torch_threads: int | None = None,
) -> torch.Tensor:
    """Continue `input_ids` [B, T] (or [T]; unpadded) by up to `max_new_tokens` tokens; return [B, T + n] int64.

    * `temperature` 0: greedy, token-identical to `model.generate(do_sample=False)` in float32. Otherwise sample
      with temperature, `top_k` and `top_p` (HF's order); `seed` makes it reproducible (a private generator;
      None: torch's global RNG). Seeded samples are reproducible here but are not HF's samples.
    * Stops when every row has emitted an EOS (`eos_token_id`, default from the generation config, `[]` to
      disable) or its generated text contains one of `stop_strings` (needs `tokenizer`; the token completing it
      is kept); finished rows are padded with `pad_token_id`, as HF does.
    * `stream(tokens)` is called with the new token ids [B] after every step (`TextStream` prints text).
    * `compile`: True (or an inductor mode such as "max-autotune-no-cudagraphs") compiles the decode step once
      per Decoder (tens of seconds on 2 cores); prefill stays eager. Set torch's thread count before.
    * `inference_mode`: `torch.inference_mode` instead of `no_grad` (~0.8 ms less dispatch per token on 30
      layers), but tensors an FFN creates and keeps during the call become inference tensors.
    * `torch_threads`: torch's intra-op threads during the decode steps (prefill keeps the caller's), while
      upcycle's C kernels keep the caller's count, fixed (no per-call 1-or-N choice). None: 1 for a model
      `upcycle.quantize`d or float32 with bank-sparse FFNs (its biggest work runs in those kernels; torch's thread
      team adds wake-ups to the small ops left: bench/results/cpu_decode_epyc*.md, rows [torch N threads]),
      unchanged for a dense float model (its GEMVs are torch's) and a bf16 / fp16 one.
    """
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [batch, tokens] with at least one token, got {tuple(input_ids.shape)}")
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise ValueError("upcycle.generate runs on CPU: use model.generate for a model on another device.")
    input_ids = input_ids.to(torch.long)
    bsz, t = input_ids.shape
    if max_new_tokens <= 0:
        return input_ids.clone()
    if temperature < 0 or (top_p is not None and not 0 < top_p <= 1) or (top_k is not None and top_k < 0):
        raise ValueError("temperature must be >= 0, top_p in (0, 1], top_k >= 0")
    eos, pad = _special_ids(model, eos_token_id, pad_token_id)
    eos_t = torch.tensor(eos, dtype=torch.long) if eos else None
    stopper = _StopStrings(stop_strings, tokenizer) if stop_strings else None
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    out = torch.empty(bsz, t + max_new_tokens, dtype=torch.long)
    out[:, :t] = input_ids
    unfinished = torch.ones(bsz, dtype=torch.bool)
    checks = eos_t is not None or stopper is not None
    with torch.no_grad():  # outside inference mode: the cache must stay usable under either mode
        dec = get_decoder(model, bsz, t + max_new_tokens)
        if compile:
            _prepare_for_compile(model)
    with torch.inference_mode() if inference_mode else torch.no_grad():
        step: Callable[[torch.Tensor, torch.Tensor | int], torch.Tensor] = dec.forward
        if compile:
            step = dec.compiled_step(None if compile is True else compile)
        logits = dec.forward(input_ids, 0)  # prefill stays eager: one call, variable length
        n = 0
        threads = contextlib.ExitStack()
        n_torch = torch.get_num_threads()
        decode_threads = torch_threads or (1 if _kernels_lead(model) and not compile else n_torch)
        if decode_threads != n_torch:
            from upcycle.kernels import cpu

            threads.enter_context(cpu.pool_threads(n_torch))
            torch.set_num_threads(decode_threads)
            threads.callback(torch.set_num_threads, n_torch)
        with threads:
            for n in range(1, max_new_tokens + 1):
                tok = _sample(logits, temperature, top_k, top_p, gen)
                if checks:
                    tok = torch.where(unfinished, tok, pad)
                out[:, t + n - 1] = tok
                if stream is not None:
                    stream(tok)
                if eos_t is not None:
                    unfinished &= ~torch.isin(tok, eos_t)
                if stopper is not None:
                    for b in range(bsz):
                        if unfinished[b] and stopper.hit(out[b, t : t + n].tolist()):
                            unfinished[b] = False
                if n == max_new_tokens or (checks and not unfinished.any()):
                    break
                p = t + n - 1
                logits = step(tok[:, None], torch.tensor([p]) if compile else p)
    return out[:, : t + n].clone()
