"""Tiny models and an offline corpus every machine has (the Python standard library's own source).

Used by the tests, the demo and the benchmarks, so nothing is downloaded.
"""

from __future__ import annotations

import os
import random
import sysconfig
from pathlib import Path

import torch


def stdlib_files(seed: int = 0) -> list[Path]:
    """The standard library's .py files (no tests, no site-packages), in a seeded order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p
        for p in root.rglob("*.py")
        if "site-packages" not in p.parts and "test" not in p.parts and "tests" not in p.parts
    )
    if not files:
        raise FileNotFoundError(f"no Python source found under {root}")
    random.Random(seed).shuffle(files)
    return files


def stdlib_corpus(max_bytes: int = 2_000_000, seed: int = 0, skip_bytes: int = 0) -> list[str]:
    """Documents (one per source file) totalling about `max_bytes`, after skipping `skip_bytes`.

    Disjoint (train, held-out) splits: call once with skip_bytes=0 and once with skip_bytes=max_bytes.
    """
    docs, seen, total = [], 0, 0
    for f in stdlib_files(seed):
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        seen += len(text)
        if seen <= skip_bytes:
            continue
        docs.append(text)
        total += len(text)
        if total >= max_bytes:
            break
    return docs


def train_bpe_tokenizer(texts: list[str], vocab_size: int = 2048):
    """A byte-level BPE tokenizer trained on `texts`, as a transformers PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>")


def tiny_config(
    arch: str = "qwen2",
    vocab_size: int = 2048,
    hidden_size: int = 64,
    intermediate_size: int = 256,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    max_position_embeddings: int = 2048,
    **kwargs,
):
    """A small HF config of a SwiGLU architecture: qwen2, llama, mistral or qwen3."""
    import transformers

    cls = {
        "qwen2": transformers.Qwen2Config,
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen3": transformers.Qwen3Config,
    }[arch]
    return cls(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=max_position_embeddings,
        **kwargs,
    )


def tiny_model(arch: str = "qwen2", seed: int = 0, **kwargs):
    """A random-init tiny causal LM (eval mode)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(arch, **kwargs)).eval()


def cpu_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def pretrain(model, windows: torch.Tensor, steps: int, batch_size: int = 16, lr: float = 3e-3, seed: int = 0,
             progress: bool = True) -> list[float]:
    """Plain next-token pretraining of a small dense model (AdamW, warm-up + cosine); returns the losses."""
    from tqdm.auto import tqdm

    from upcycle.train.schedules import lr_factor

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, warmup, 0.0))
    model.train()
    losses = []
    bar = tqdm(range(steps), desc="pretrain", disable=not progress)
    for _ in bar:
        ids = windows[torch.randint(len(windows), (batch_size,), generator=gen)]
        loss = model(ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return losses


def write_tiny_gguf(path, tokenizer=None, seed: int = 0, **config) -> Path:
    """A tiny random Llama model as a GGUF file (f32, with a GPT-2-style BPE tokenizer inside), written with the
    `gguf` package: what the GGUF-reading paths (the real demo, `upcycle convert --model X.gguf`) are tested on.
    q/k are written as they are (llama.cpp's converter would permute them for its RoPE layout): the loaded model
    is a valid random model, not the one written."""
    import json
    from pathlib import Path

    import gguf

    tok = tokenizer or train_bpe_tokenizer(stdlib_corpus(200_000), vocab_size=300)
    cfg = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, tie_word_embeddings=True, **config)
    model = tiny_model("llama", seed=seed, **cfg)
    c = model.config
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(c.vocab_size)
    w.add_file_type(0)  # all f32
    vocab = tok.backend_tokenizer.get_vocab()
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    w.add_tokenizer_model("gpt2")
    w.add_token_list([t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])])
    w.add_token_types([1] * len(vocab))
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    w.add_eos_token_id(tok.eos_token_id)
    w.add_bos_token_id(tok.eos_token_id)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    parts = [("input_layernorm", "attn_norm"), ("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"),
             ("self_attn.v_proj", "attn_v"), ("self_attn.o_proj", "attn_output"),
             ("post_attention_layernorm", "ffn_norm"), ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"),
             ("mlp.down_proj", "ffn_down")]
    for i in range(c.num_hidden_layers):
        names |= {f"model.layers.{i}.{a}.weight": f"blk.{i}.{b}.weight" for a, b in parts}
    sd = model.state_dict()
    for hf_name, gguf_name in names.items():
        w.add_tensor(gguf_name, sd[hf_name].float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)
