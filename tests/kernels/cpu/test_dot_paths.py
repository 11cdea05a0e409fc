"""Every shadow-scoring dot path of the fused CPU kernel this machine supports, forced by its switch, against the
float reference; paths the CPU lacks are skipped with the missing feature named. And the feature parser."""

from __future__ import annotations

import pytest
import torch

from upcycle.kernels import cpu, use_kernels
from upcycle.kernels.cpu import features
from upcycle.kernels.packing import pack_shadow
from upcycle.kernels.reference import (
    bank_topk_indices,
    shadow_dequantize,
    shadow_quantize,
    shadow_scores,
    sparse_swiglu_gather_reference,
)

needs_fused = pytest.mark.skipif(cpu._compiler() is None, reason="no C compiler: fused CPU kernel not built")


def _skip_unless_supported(path: str) -> None:
    if not features.dot_path_supported(path):
        pytest.skip(f"this CPU lacks {', '.join(features.missing(path)) or 'x86-64'} for the {path} path")


@needs_fused
@pytest.mark.parametrize("path", list(features.DOT_PATHS))
@pytest.mark.parametrize("bits,group,d", [(2, 128, 256), (2, 96, 192), (4, 64, 192), (4, 48, 192), (8, 32, 96),
                                          (3, 24, 96), (2, 12, 96), (8, 200, 200), (1, 192, 384), (1, 24, 96),
                                          (1, 8, 96)])
@pytest.mark.parametrize("T", [1, 3])
def test_dot_path_matches_reference(path, bits, group, d, T):
    _skip_unless_supported(path)
    d_ff, bank, keep = 256, 64, 16
    w_gate, w_up = torch.randn(d_ff, d) / d**0.5, torch.randn(d_ff, d) / d**0.5
    w_down = torch.randn(d, d_ff) / d_ff**0.5
    x = torch.randn(T, d)
    x[:, 3] *= 20  # an outlier input: per-group int16 scaling must cope
    pack = pack_shadow(w_gate, w_up, bits, group)
    idx = torch.full((T, d_ff // bank * keep), -1, dtype=torch.int32)
    with use_kernels(shadow_dots=path):
        assert cpu.resolve_dot_path() == path
        y = cpu.fused_sparse_decode(x, w_gate, w_up, w_down.t().contiguous(), None, None, None, bank, keep,
                                    idx_out=idx, shadow=pack)
    assert features.DISPATCH["bank_sparse.shadow_dots"] == path
    gq, uq = (shadow_dequantize(*shadow_quantize(w, bits, group)) for w in (w_gate, w_up))
    ref_idx = bank_topk_indices(shadow_scores(x, gq, uq), bank, keep)
    assert (idx.long() == ref_idx).float().mean() > 0.99  # a near-tie may flip under another summation order
    ref = sparse_swiglu_gather_reference(x, w_gate, w_up, w_down, idx.long())
    assert ((y - ref).norm() / ref.norm()).item() < 1e-5


@needs_fused
@pytest.mark.parametrize("bits", [1, 2])
def test_integer_paths_agree_with_each_other_and_auto_is_the_best(bits):
    """The integer sums are exact in every path: the scores agree to float rounding, so the kept channels match."""
    paths = [p for p in cpu.available_dot_paths() if p != "float"]
    if not paths:
        pytest.skip("no integer dot path on this CPU (needs avx2)")
    d, d_ff = 896, 512
    w_gate, w_up, w_dt = (torch.randn(d_ff, d) / d**0.5 for _ in range(3))
    pack = pack_shadow(w_gate, w_up, bits, 128)
    x = torch.randn(4, d)
    got = {}
    for p in paths:
        idx = torch.empty(4, d_ff // 64 * 16, dtype=torch.int32)
        with use_kernels(shadow_dots=p):
            cpu.fused_sparse_decode(x, w_gate, w_up, w_dt, None, None, None, 64, 16, idx_out=idx, shadow=pack)
        got[p] = idx
    assert all((got[p] == got[paths[0]]).float().mean() > 0.998 for p in paths)
    with use_kernels(shadow_dots="auto"):
        assert cpu.resolve_dot_path() == features.auto_path("shadow")


@needs_fused
def test_unsupported_or_unknown_path_is_refused_by_name():
    missing = [p for p in features.DOT_PATHS if not features.dot_path_supported(p)]
    if missing:
        with pytest.raises(ValueError, match=features.missing(missing[0])[0]):
            cpu.resolve_dot_path(missing[0])
    with pytest.raises(KeyError):
        cpu.resolve_dot_path("sse9")


X86 = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx f16c fma avx2 avx512f avx512bw avx512vl avx512_vnni avx_vnni amx_tile amx_int8
processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx f16c fma avx2 avx512f avx512bw avx512vl avx512_vnni avx_vnni amx_tile amx_int8
"""
ZEN2 = "model name\t: AMD EPYC 7R32\nflags\t\t: fpu sse2 avx f16c fma avx2 bmi2\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd evtstrm asimddp sve i8mm bf16\n"


def test_parse_cpuinfo():
    xeon = features.parse_cpuinfo(X86, "x86_64")
    assert xeon["model_name"] == "Intel(R) Xeon(R) Platinum 8480+" and xeon["machine"] == "x86_64"
    assert xeon["avx512_vnni"] and xeon["avx_vnni"] and xeon["amx_int8"] and not xeon["amx_bf16"]
    epyc = features.parse_cpuinfo(ZEN2, "x86_64")
    assert epyc["avx2"] and not epyc["avx512f"] and not epyc["avx_vnni"]
    arm = features.parse_cpuinfo(ARM, "aarch64")
    assert arm["neon"] and arm["asimddp"] and arm["i8mm"] and not arm["avx2"]
    assert features.parse_cpuinfo("", "x86_64")["model_name"]  # nothing readable: a name all the same


def test_real_machine_features_are_typed():
    feats = features.cpu_features()
    assert all(isinstance(feats[f], bool) for f in features.X86_FLAGS + features.ARM_FLAGS)
    assert isinstance(feats["model_name"], str) and feats["model_name"]
    assert features.dot_paths()[-1] == "float"


@needs_fused
def test_info_kernels_reports_cpu_features_and_chosen_paths(capsys):
    import json

    from upcycle.cli import main

    assert main(["info", "--kernels", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["cpu"] == features.cpu_features()["model_name"]
    assert set(r["features"]) <= set(features.X86_FLAGS + features.ARM_FLAGS)
    assert r["kernels"]["bank_sparse"]["shadow_dots"] == features.auto_path("shadow")
    assert "f32" in r["kernels"]["bank_sparse"]["weights"]
    assert r["kernels"]["int8_linear"]["dots"] == features.auto_path("int8")
    assert main(["info", "--kernels"]) == 0
    assert "shadow dots -> " in capsys.readouterr().out
