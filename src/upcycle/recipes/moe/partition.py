"""Partition the d_ff intermediate channels of a dense FFN into G equal slices.

``cluster`` groups channels that fire together (MoEfication-style), so a routed slice is a coherent
sub-network rather than an arbitrary index range: each channel is described by its standardised
|activation| profile over calibration tokens, and balanced spherical k-means puts exactly d_ff / G
channels in each cluster.
"""

from __future__ import annotations

import torch


def contiguous_partition(d_ff: int, num_slices: int) -> torch.Tensor:
    """[G, f] channel indices: slice g = channels g*f .. (g+1)*f - 1."""
    return torch.arange(d_ff).view(num_slices, d_ff // num_slices)


def channel_profiles(h: torch.Tensor) -> torch.Tensor:
    """h [N, F] intermediate activations -> [F, N] unit-norm, zero-mean |h| profiles.

    The dot product of two profiles is then the Pearson correlation of the channels' magnitudes.
    """
    p = h.abs().float().t()  # [F, N]
    p = p - p.mean(dim=1, keepdim=True)
    return p / p.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _balanced_assign(sim: torch.Tensor, size: int) -> torch.Tensor:
    """Greedy balanced assignment: best (channel, cluster) pairs first, each cluster capped at size.

    sim [F, G] -> [F] cluster id. Greedy over the sorted pairs keeps it simple and deterministic;
    O(F * G log(F * G)), fine for d_ff up to ~10^5.
    """
    num_ch, num_cl = sim.shape
    order = sim.flatten().argsort(descending=True).tolist()
    assign = [-1] * num_ch
    fill = [0] * num_cl
    left = num_ch
    for pair in order:
        ch, cl = divmod(pair, num_cl)
        if assign[ch] < 0 and fill[cl] < size:
            assign[ch] = cl
            fill[cl] += 1
            left -= 1
            if left == 0:
                break
    return torch.tensor(assign)


def cluster_partition(h: torch.Tensor, num_slices: int, iters: int = 15, seed: int = 0) -> torch.Tensor:
    """[G, f] channel indices from balanced k-means on calibration activations h [N, F].

    Init is k-means++ on the profiles (seeded); each slice's indices are returned sorted.
    """
    prof = channel_profiles(h)  # [F, N]
    num_ch = prof.shape[0]
    if num_ch % num_slices:
        raise ValueError(f"d_ff={num_ch} is not divisible by {num_slices} slices")
    size = num_ch // num_slices
    gen = torch.Generator().manual_seed(seed)
    centers = _kmeans_pp(prof, num_slices, gen)  # [G, N]
    assign = torch.zeros(num_ch, dtype=torch.long)
    for _ in range(iters):
        new = _balanced_assign(prof @ centers.t(), size)
        if torch.equal(new, assign):
            break
        assign = new
        centers = torch.stack([prof[assign == g].mean(dim=0) for g in range(num_slices)])
        centers = centers / centers.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return torch.stack([torch.nonzero(assign == g).flatten() for g in range(num_slices)])


def _kmeans_pp(prof: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    first = int(torch.randint(prof.shape[0], (1,), generator=gen))
    centers = [prof[first]]
    dist = 1.0 - prof @ centers[0]  # cosine distance, [F]
    for _ in range(1, k):
        w = dist.clamp_min(0) ** 2
        pick = int(torch.multinomial(w / w.sum() if w.sum() > 0 else torch.ones_like(w), 1, generator=gen))
        centers.append(prof[pick])
        dist = torch.minimum(dist, 1.0 - prof @ prof[pick])
    return torch.stack(centers)
