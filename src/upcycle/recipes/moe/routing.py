"""Router math: top-k selection, auxiliary losses and routing statistics.

Everything here is computed from raw router logits in fp32, so the losses do not depend on how a
framework post-processes them (transformers' own aux loss applied softmax twice at one point).
"""

from __future__ import annotations

import math

import torch


def route(
    logits: torch.Tensor, top_k: int, router: str = "softmax_topk", norm_topk_prob: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pick top_k experts per token.

    Args:
        logits: [T, E] router logits (any float dtype).
        router: ``softmax_topk`` = softmax over all E, keep the k largest probabilities (optionally
            renormalised); ``topk_softmax`` = keep the k largest logits, softmax over those k.
    Returns:
        weights [T, k] fp32, indices [T, k] int64, probs [T, E] fp32 (full softmax, used by the losses).
    """
    logits = logits.float()
    probs = logits.softmax(dim=-1)  # [T, E]
    if router == "topk_softmax":
        top_logits, idx = logits.topk(top_k, dim=-1)  # [T, k]
        return top_logits.softmax(dim=-1), idx, probs
    weights, idx = probs.topk(top_k, dim=-1)  # [T, k]
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, idx, probs


def expert_load(idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[E] fraction of the T*k token->expert assignments that went to each expert (sums to 1)."""
    counts = torch.bincount(idx.reshape(-1), minlength=num_experts).float()
    return counts / counts.sum().clamp_min(1.0)


def load_balance_loss(probs: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Switch-Transformer load balance, normalised to 1.0 at perfect balance.

    L = E * sum_e f_e * P_e, with f_e = share of the T*k assignments routed to expert e (no gradient)
    and P_e = mean over tokens of the full-softmax probability of e. Uniform f and P give
    E * E * (1/E)^2 = 1; all tokens on one expert with probability 1 gives E.
    """
    num_experts = probs.shape[-1]
    f = expert_load(idx, num_experts)  # [E]
    p = probs.float().mean(dim=0)  # [E]
    return num_experts * (f * p).sum()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Router z-loss (ST-MoE): mean over tokens of logsumexp(logits)^2; keeps logits small."""
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


@torch.no_grad()
def routing_stats(probs: torch.Tensor, idx: torch.Tensor) -> dict[str, float | torch.Tensor]:
    """Per-forward routing health, for logging.

    Returns load ([E] assignment fractions), max_violation (max load / ideal load - 1; 0 = balanced),
    dead_experts (experts that received no token), entropy (mean per-token router entropy, nats) and
    entropy_norm (entropy / log E; 1 = uniform router, 0 = one-hot).
    """
    num_experts = probs.shape[-1]
    load = expert_load(idx, num_experts)
    entropy = -(probs * probs.clamp_min(1e-30).log()).sum(dim=-1).mean().item()
    return {
        "load": load.cpu(),
        "max_violation": (load.max() * num_experts - 1.0).item(),
        "dead_experts": int((load == 0).sum().item()),
        "entropy": entropy,
        "entropy_norm": entropy / math.log(num_experts) if num_experts > 1 else 0.0,
    }


def jitter(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Multiplicative uniform(1 - eps, 1 + eps) noise (Switch Transformer router-input jitter)."""
    if eps <= 0:
        return x
    return x * torch.empty_like(x).uniform_(1.0 - eps, 1.0 + eps)


__all__ = ["route", "expert_load", "load_balance_loss", "z_loss", "routing_stats", "jitter"]
