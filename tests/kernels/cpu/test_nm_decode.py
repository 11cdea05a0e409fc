"""The N:M (2:4) CPU decode kernel vs the pure-PyTorch reference, on fresh random inputs, for every path this CPU
runs (the others are skipped with the CPU feature they need), plus the compressed format it reads."""

from __future__ import annotations

import pytest
import torch

from upcycle.kernels.cpu import build, nm
from upcycle.kernels.nm_packing import NM24Pack, pack_nm24, positions, unpack_nm24
from upcycle.kernels.reference import nm24_linear_reference

needs_cc = pytest.mark.skipif(build.compiler() is None, reason="no C compiler: the N:M CPU kernel is not built")
PATHS = nm.available_paths() if build.compiler() else []
# (out, in): odd row counts, widths that are not multiples of 32 / 16 / 8 (the SIMD tails), a real FFN width
SHAPES = [(1, 4), (3, 8), (5, 20), (7, 36), (2, 48), (9, 100), (17, 132), (64, 256), (65, 896), (11, 4864)]
TOKENS = [1, 2, 3, 5, 8, 9, 17]


def _sparse_weight(out: int, inp: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    w = torch.randn(out, inp, generator=gen)
    keep = w.abs().reshape(out, -1, 4).topk(2, dim=-1).indices
    mask = torch.zeros(out, inp // 4, 4, dtype=torch.bool).scatter_(-1, keep, True).reshape(out, inp)
    return (w * mask).to(dtype)


def test_pack_unpack_round_trip_with_sparser_groups():
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for out, inp in SHAPES:
            w = _sparse_weight(out, inp, dtype, g)
            w[0, :4] = 0  # a group with no nonzero
            w[-1, -4:] = torch.tensor([0, 0, 0, 3.0]).to(dtype)  # a group with one
            p = pack_nm24(w)
            assert p.values.shape == (out, inp // 2) and p.indices.shape == (out, (inp // 2 + 3) // 4)
            assert p.values.dtype == dtype and p.indices.dtype == torch.uint8
            assert torch.equal(unpack_nm24(p), w)


def test_the_byte_layout_is_the_documented_one():
    w = torch.zeros(1, 16)
    w[0, [1, 3, 4, 6, 8, 9, 14, 15]] = torch.arange(1.0, 9.0)  # positions 1,3 | 0,2 | 0,1 | 2,3
    p = pack_nm24(w)
    assert p.values.tolist() == [[1, 2, 3, 4, 5, 6, 7, 8]]
    # kept value k's position is bits 2(k%4)..2(k%4)+1 of byte k//4: [1,3,0,2] -> 0b10_00_11_01, [0,1,2,3] -> 0b11100100
    assert p.indices.tolist() == [[0b10001101, 0b11100100]]
    assert positions(p).tolist() == [[1, 3, 0, 2, 0, 1, 2, 3]]


def test_pack_refuses_what_is_not_2_4():
    with pytest.raises(ValueError, match="not 2:4"):
        pack_nm24(torch.ones(2, 8))
    with pytest.raises(ValueError, match="divisible by 4"):
        pack_nm24(torch.zeros(2, 6))
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        pack_nm24(torch.zeros(2, 8, dtype=torch.float16))


@needs_cc
def test_the_scalar_path_is_always_there():
    assert "scalar" in PATHS


@needs_cc
@pytest.mark.parametrize("path", ["scalar", "avx2", "avx512"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_path_matches_the_reference(path, dtype):
    if path not in PATHS:
        pytest.skip(f"this CPU lacks {nm.CPU_FEATURES[path]}: the {path} path cannot run here")
    g = torch.Generator().manual_seed(hash((path, str(dtype))) % 2**31)
    for out, inp in SHAPES:
        p = pack_nm24(_sparse_weight(out, inp, dtype, g))
        for T in TOKENS if out * inp < 10**5 else (1, 3):
            x = torch.randn(T, inp, generator=g).to(dtype)  # fresh inputs every call
            bias = torch.randn(out, generator=g) if T % 2 else None
            y = nm.nm24_linear(x, p.values, p.indices, bias, path=path, num_threads=1)
            ref = nm24_linear_reference(x, p, bias)
            assert y.dtype == dtype and y.shape == (T, out)
            tol = 1e-5 if dtype == torch.float32 else 1e-2
            err = ((y.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
            assert err < tol, (path, dtype, out, inp, T, err)


@needs_cc
def test_threads_do_not_change_a_bit_and_leading_dims_are_kept():
    g = torch.Generator().manual_seed(3)
    p = pack_nm24(_sparse_weight(1000, 256, torch.float32, g))
    x = torch.randn(2, 3, 256, generator=g)
    ys = [nm.nm24_linear(x, p.values, p.indices, num_threads=n) for n in (1, 2, 3)]
    assert ys[0].shape == (2, 3, 1000)
    assert all(torch.equal(ys[0], y) for y in ys[1:])
    assert torch.allclose(ys[0], nm24_linear_reference(x, p), atol=1e-4)


@needs_cc
def test_bad_arguments_are_refused():
    p = pack_nm24(torch.zeros(4, 8))
    with pytest.raises(ValueError, match="features"):
        nm.nm24_linear(torch.zeros(1, 12), p.values, p.indices)
    with pytest.raises(ValueError, match="path"):
        nm.nm24_linear(torch.zeros(1, 8), p.values, p.indices, path="neon")
    with pytest.raises(ValueError, match="indices shape"):
        nm.nm24_linear(torch.zeros(1, 8), p.values, p.indices[:, :0])


@needs_cc
def test_the_portable_build_has_only_the_scalar_path(tmp_path, monkeypatch):
    """The file compiled as on a non-x86 machine (UPC_NM_NO_SIMD): scalar only, same results, and a forced SIMD
    path is an error, not a silent fallback."""
    src = tmp_path / "csrc"
    src.mkdir()
    (src / "nm_decode.c").write_text((build.source_dir() / "nm_decode.c").read_text())
    (src / "nm_portable.c").write_text('#define UPC_NM_NO_SIMD 1\n#include "nm_decode.c"\n')
    monkeypatch.setattr(build, "source_dir", lambda: src)
    monkeypatch.setenv("UPCYCLE_CACHE", str(tmp_path / "cache"))
    lib = nm._build("nm_portable.c", "nm_portable")
    assert nm.available_paths(lib) == ["scalar"]
    g = torch.Generator().manual_seed(11)
    p = pack_nm24(_sparse_weight(13, 36, torch.bfloat16, g))
    x = torch.randn(3, 36, generator=g)
    assert torch.allclose(nm.nm24_linear(x, p.values, p.indices, lib=lib), nm24_linear_reference(x, p), atol=1e-5)
    with pytest.raises(RuntimeError, match="not supported by this CPU"):
        nm.nm24_linear(x, p.values, p.indices, path="avx2", lib=lib)


def test_pack_is_a_plain_dataclass():
    p = pack_nm24(torch.zeros(2, 8))
    assert isinstance(p, NM24Pack) and p.nbytes == 2 * 4 * 4 + 2 * 1 and p.out_features == 2
