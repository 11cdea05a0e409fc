"""The training objective: LM cross-entropy + KL to a frozen dense teacher + per-layer feature loss + the
auxiliary losses the recipe's modules record (by name: the bank-sparse oracle BCE "aux", an MoE router's
"load_balance" and "z_loss", ...).

Logits are computed a chunk of tokens at a time under activation checkpointing, so the [tokens, vocab]
logits of student and teacher never exist in full (at 32K tokens x 152K vocab that is 20 GB in fp32).
`Objective` is an nn.Module so that, sharded with FSDP2 as the root, the embedding / final norm /
LM head it owns are gathered for the whole loss computation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


def _upcast(t: Tensor) -> Tensor:
    """bf16 / fp16 logits -> fp32 for the softmax; fp32 and fp64 stay as they are."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


def _chunk_losses(h: Tensor, w: Tensor, b: Tensor | None, y: Tensor, th: Tensor | None, tw: Tensor | None,
                  tb: Tensor | None, temperature: float) -> tuple[Tensor, Tensor]:
    """Summed CE and summed T^2-scaled KL(teacher || student) over the rows of one chunk."""
    logits = _upcast(F.linear(h, w, b))
    ce = F.cross_entropy(logits, y, reduction="sum")
    if th is None:
        return ce, logits.new_zeros(())
    t_logits = _upcast(F.linear(th, tw, tb))
    logp_s = F.log_softmax(logits / temperature, dim=-1)
    logp_t = F.log_softmax(t_logits / temperature, dim=-1)
    kl = (logp_t.exp() * (logp_t - logp_s)).sum() * temperature**2
    return ce, kl


def lm_losses(hidden: Tensor, head: nn.Linear, input_ids: Tensor, teacher_hidden: Tensor | None = None,
              teacher_head: nn.Linear | None = None, temperature: float = 1.0,
              chunk_tokens: int = 2048) -> tuple[Tensor, Tensor]:
    """Token-mean next-token CE and KL (zero without a teacher); hidden states [B, L, d] in, scalars out."""
    d = hidden.shape[-1]
    h = hidden[:, :-1].reshape(-1, d)
    y = input_ids[:, 1:].reshape(-1)
    th = None if teacher_hidden is None else teacher_hidden[:, :-1].reshape(-1, teacher_hidden.shape[-1])
    tw = None if teacher_head is None else teacher_head.weight
    tb = None if teacher_head is None else teacher_head.bias
    n = y.numel()
    step = n if chunk_tokens <= 0 else chunk_tokens
    ce = kl = None
    for s in range(0, n, step):
        args = (h[s : s + step], head.weight, head.bias, y[s : s + step],
                None if th is None else th[s : s + step], tw, tb, temperature)
        if torch.is_grad_enabled() and step < n:
            # Only the chunk's inputs are saved; its logits are recomputed in the backward pass.
            c, k = checkpoint(_chunk_losses, *args, use_reentrant=False)
        else:
            c, k = _chunk_losses(*args)
        ce, kl = (c, k) if ce is None else (ce + c, kl + k)
    return ce / n, kl / n


def feature_loss(student: tuple[Tensor, ...], teacher: tuple[Tensor, ...]) -> Tensor:
    """Mean over layers of ||s - t||^2 / ||t||^2 (SquareHead-style normalised MSE of each layer's output)."""
    if len(student) != len(teacher):
        raise ValueError(f"student has {len(student)} layer outputs, teacher {len(teacher)}: same architecture needed.")
    terms = [(s.float() - t.float()).pow(2).mean() / t.float().pow(2).mean().clamp_min(1e-8)
             for s, t in zip(student, teacher, strict=True)]
    return torch.stack(terms).mean()


def collect_aux_losses(model: nn.Module) -> dict[str, Tensor]:
    """Every submodule's `aux_losses()` (name -> scalar), averaged over the modules that report a name."""
    found: dict[str, list[Tensor]] = {}
    for m in model.modules():
        fn = getattr(m, "aux_losses", None)
        if callable(fn):
            for name, value in fn().items():
                found.setdefault(name, []).append(value)
    return {name: torch.stack([v.float() for v in vs]).mean() for name, vs in found.items()}


class Objective(nn.Module):
    """forward(input_ids, teacher_hidden, teacher_head, aux_weight, teacher_features) -> {'loss', 'ce', 'kl', 'feat',
    'aux', and every recorded auxiliary loss by name}. `teacher_features`: the teacher's per-layer outputs, for
    `feature_weight` > 0. `aux_weight`: {name: weight} of the auxiliary losses to add (a float: the weight of
    "aux").

    The recipe's modules must record their auxiliary losses for the whole forward + backward (the train
    hooks' `begin_aux` / `end_aux`): activation checkpointing replays the forward and must see the same flag.
    """

    def __init__(self, model: nn.Module, distill_weight: float = 0.0, temperature: float = 1.0,
                 chunk_tokens: int = 2048, feature_weight: float = 0.0):
        super().__init__()
        self.model = model
        self.distill_weight = distill_weight
        self.feature_weight = feature_weight
        self.temperature = temperature
        self.chunk_tokens = chunk_tokens

    def forward(self, input_ids: Tensor, teacher_hidden: Tensor | None = None,
                teacher_head: nn.Linear | None = None, aux_weight: float | dict[str, float] = 0.0,
                teacher_features: tuple[Tensor, ...] | None = None) -> dict[str, Tensor]:
        want_features = teacher_features is not None and self.feature_weight > 0
        out = self.model.get_decoder()(input_ids=input_ids, use_cache=False, output_hidden_states=want_features)
        hidden = out.last_hidden_state
        ce, kl = lm_losses(hidden, self.model.get_output_embeddings(), input_ids, teacher_hidden, teacher_head,
                           self.temperature, self.chunk_tokens)
        loss = ce + self.distill_weight * kl if teacher_hidden is not None else ce
        feat = ce.new_zeros(())
        if want_features:
            feat = feature_loss(out.hidden_states[1:], teacher_features)
            loss = loss + self.feature_weight * feat
        weights = {"aux": aux_weight} if isinstance(aux_weight, (int, float)) else dict(aux_weight)
        weights = {k: w for k, w in weights.items() if w > 0}
        parts = {"aux": ce.new_zeros(())}
        if weights and torch.is_grad_enabled():
            for name, value in collect_aux_losses(self.model).items():
                parts[name] = value
                if name in weights:
                    loss = loss + weights[name] * value
        result = {"loss": loss, "ce": ce.detach(), "kl": kl.detach(), "feat": feat.detach()}
        return result | {k: v.detach() for k, v in parts.items()}


@torch.no_grad()
def teacher_hidden_states(teacher: nn.Module, input_ids: Tensor, features: bool = False):
    """The frozen teacher's final hidden states [B, L, d] (its logits are formed chunk-wise in the loss);
    with `features`, (final, per-layer outputs) for the feature loss."""
    out = teacher.get_decoder()(input_ids=input_ids, use_cache=False, output_hidden_states=features)
    return (out.last_hidden_state, tuple(out.hidden_states[1:])) if features else out.last_hidden_state
