"""The compressed 2:4 weight format read by the N:M decode kernel: the kept half of the values plus 2-bit
in-group positions.

At batch 1 a linear layer is bound by the bytes it streams. Keeping only the values of a 2:4 weight
(in/2 per row) plus 2 bits per kept value is 0.53x the dense bytes in fp32 and 0.5625x in bf16, and the
kernel reads both arrays strictly sequentially, row by row.

Layout, per row o with K = in/2 kept values in column order:
  values  [out, K]           the weight's dtype (float32 or bfloat16)
  indices [out, ceil(K/4)]   uint8; kept value k's position inside its group of 4 is
                             (indices[o, k // 4] >> 2 * (k % 4)) & 3, its column 4 * (k // 2) + position
A group with fewer than 2 nonzeros stores zeros in the free slots, so every group holds exactly 2 values.
Tensor in, tensor out; `reference.nm24_linear_reference` is the matmul on this format.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

N, M = 2, 4
DTYPES = (torch.float32, torch.bfloat16)
_SHIFTS = (0, 2, 4, 6)


@dataclass
class NM24Pack:
    """A 2:4 weight [out, in] in compressed form (see the module docstring)."""

    values: Tensor  # [out, in / 2], float32 or bfloat16
    indices: Tensor  # [out, ceil(in / 8)], uint8
    in_features: int

    @property
    def out_features(self) -> int:
        return self.values.shape[0]

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + self.indices.nbytes


def nonzeros_per_group(weight: Tensor, m: int = M) -> Tensor:
    """[out, in / m] count of nonzeros in each group of m consecutive inputs."""
    out, inp = weight.shape
    return (weight.detach().reshape(out, inp // m, m) != 0).sum(-1)


def pack_nm24(weight: Tensor) -> NM24Pack:
    """Compress a weight [out, in] with at most 2 nonzeros in every group of 4 consecutive inputs.

    ValueError for another dtype, a width not divisible by 4, or a weight that is not 2:4 (a group with 3 or
    4 nonzeros): nonzeros are never dropped silently.
    """
    if weight.dim() != 2:
        raise ValueError(f"pack_nm24: weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    out, inp = weight.shape
    if inp % M:
        raise ValueError(f"pack_nm24: in_features={inp} is not divisible by {M}")
    if weight.dtype not in DTYPES:
        raise ValueError(f"pack_nm24: weight dtype must be float32 or bfloat16, got {weight.dtype}")
    w = weight.detach().cpu().reshape(out, inp // M, M)
    nz = w != 0
    if (nz.sum(-1) > N).any():
        raise ValueError("pack_nm24: the weight is not 2:4 (a group of 4 consecutive inputs has more than 2 nonzeros)")
    # The two nonzero slots first (zeros rank last, lower index first on ties), then in column order.
    pos = nz.to(torch.int8).topk(N, dim=-1, sorted=True).indices.sort(dim=-1).values  # [out, G, 2]
    values = w.gather(-1, pos).reshape(out, -1).contiguous()
    k = values.shape[1]
    codes = F.pad(pos.reshape(out, k).to(torch.uint8), (0, (-k) % 4)).reshape(out, -1, 4)
    packed = (codes << torch.tensor(_SHIFTS, dtype=torch.uint8)).sum(-1, dtype=torch.uint8)
    return NM24Pack(values, packed.contiguous(), inp)


def positions(p: NM24Pack) -> Tensor:
    """In-group positions [out, K] (int64, 0..3) of the kept values."""
    codes = (p.indices.unsqueeze(-1) >> torch.tensor(_SHIFTS, dtype=torch.uint8)) & 3
    return codes.reshape(p.out_features, -1)[:, : p.values.shape[1]].long()


def unpack_nm24(p: NM24Pack) -> Tensor:
    """The dense weight [out, in] in the values' dtype (zeros outside the kept positions)."""
    out, k = p.values.shape
    cols = positions(p) + 4 * (torch.arange(k) // 2)
    return torch.zeros(out, p.in_features, dtype=p.values.dtype).scatter_(1, cols, p.values)
