"""Every plugin configuration's AOT PTX, loaded and launched through CuPy with exactly the declared launch
parameters (``pytest -m gpu``), compared with the torch reference. This is the TensorRT plugin boundary
minus TensorRT itself: TensorRT would receive the same PTX, entry name, grid/block/shared memory and
argument list from ``tensorrt_plugins.py``.
"""

import itertools

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")
pytest.importorskip("cupy")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from qcompiler.plugins.int4_gemm import INT4_TACTICS  # noqa: E402 - after the importorskips
from qcompiler.plugins.int4_gemm_mma import INT4_MMA_TACTICS  # noqa: E402
from qcompiler.plugins.int4_gemm_wgmma import INT4_WGMMA_TACTICS  # noqa: E402
from qcompiler.plugins.w8a8_gemm import W8A8_TACTICS  # noqa: E402
from tests.plugins.cuda_kernels import key_padding  # noqa: E402

DT = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _poison(shape, dtype):
    if dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device="cuda")
    return torch.full(shape, -128 if dtype == torch.int8 else 0x7F, dtype=dtype, device="cuda")


INT4_CASES = [("float16", 1000, 32, True, True), ("bfloat16", 4096, 128, False, False), ("float16", 777, 784, False, True)]


@pytest.mark.parametrize("tactic", list(INT4_TACTICS) + list(INT4_MMA_TACTICS) + list(INT4_WGMMA_TACTICS))
@pytest.mark.parametrize("case", INT4_CASES, ids=lambda c: f"{c[0]}-K{c[1]}-g{c[2]}-zp{int(c[3])}-b{int(c[4])}")
def test_int4_plugin(tactic, case):
    from qcompiler.plugins import aot, launch
    from qcompiler.plugins.int4_gemm import int4_gemm_reference
    from qcompiler.plugins.ops import pack_int4_matmulnbits

    dtype, K, bs, zp, has_bias = case
    N = 300
    cfg = aot.Int4GemmPlugin(dtype, N, K, bs, zp, has_bias, tactic)
    if tactic not in aot.tactics(cfg):
        pytest.skip(f"{tactic} is not offered for K={K}, block_size={bs} (CUDA C++ kernel: block_size % 32, K % 8)")
    kern = aot.build(cfg)
    torch.manual_seed(K + N)
    b, s, z = pack_int4_matmulnbits(torch.randn(N, K, device="cuda") * 0.05, bs, symmetric=not zp, scale_dtype=DT[dtype])
    bias = torch.randn(N, device="cuda", dtype=DT[dtype]) if has_bias else None
    for M in (1, 17, 300):
        x = torch.randn(M, K, device="cuda", dtype=DT[dtype])
        y = _poison((M, N), DT[dtype])
        launch.launch(kern, {"X": x, "B": b, "scales": s, "zero_points": z, "bias": bias, "Y": y}, {"M": M})
        torch.cuda.synchronize()
        ref = int4_gemm_reference(x, b, s, z, bias)
        base = int4_gemm_reference(x, b, s, z, bias, compute_dtype=DT[dtype])
        assert not torch.isnan(y).any(), (tactic, M)
        assert rel(y, ref) <= 2 * rel(base, ref) + 2e-3, (tactic, M)


@pytest.mark.parametrize("tactic,has_bias,out", [(t, b, o) for t, (b, o) in itertools.product(
    list(W8A8_TACTICS), [(True, "float16"), (False, "bfloat16")])])
def test_w8a8_plugin(tactic, has_bias, out):
    from qcompiler.plugins import aot, launch
    from qcompiler.plugins.w8a8_gemm import w8a8_gemm_reference

    N, K = 320, 1056
    kern = aot.build(aot.W8A8GemmPlugin(out, N, K, has_bias, tactic))
    torch.manual_seed(1)
    bw = torch.randint(-127, 128, (N, K), device="cuda", dtype=torch.int8)
    sb = torch.rand(N, device="cuda") * 1e-2
    bias = torch.randn(N, device="cuda", dtype=DT[out]) if has_bias else None
    for M in (1, 130):
        a = torch.randint(-127, 128, (M, K), device="cuda", dtype=torch.int8)
        sa = torch.rand(M, device="cuda") * 1e-2
        y = _poison((M, N), DT[out])
        launch.launch(kern, {"A": a, "a_scale": sa, "B": bw, "b_scale": sb, "bias": bias, "Y": y}, {"M": M})
        torch.cuda.synchronize()
        assert rel(y, w8a8_gemm_reference(a, bw, sa, sb, bias)) < (1e-3 if out == "float16" else 8e-3)


@pytest.mark.parametrize("norm", ["none", "rms", "layer"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_quantize_plugin(norm, dtype):
    from qcompiler.plugins import aot, launch
    from qcompiler.plugins.quantize_per_token import quantize_per_token_reference

    H, M = 1000, 37
    kern = aot.build(aot.QuantizePerTokenPlugin(dtype, H, norm, 1e-5))
    torch.manual_seed(2)
    x = torch.randn(M, H, device="cuda", dtype=DT[dtype]) * 2
    g = torch.rand(H, device="cuda", dtype=DT[dtype]) + 0.5
    bt = torch.randn(H, device="cuda", dtype=DT[dtype])
    q, s = _poison((M, H), torch.int8), _poison((M,), torch.float32)
    launch.launch(kern, {"X": x, "gamma": g, "beta": bt, "Q": q, "scale": s}, {"M": M})
    torch.cuda.synchronize()
    qr, sr = quantize_per_token_reference(x, g, bt, norm=["none", "rms", "layer"].index(norm), eps=1e-5)
    assert torch.allclose(s, sr, rtol=1e-4)
    assert (q.int() - qr.int()).abs().max() <= 1


ATTN_CASES = [  # dtype, Hq, Hkv, D, causal, masking ("", "seqlens_k", "key_mask"), tactic
    ("float16", 8, 8, 64, False, "", "d64"), ("float16", 8, 2, 64, True, "seqlens_k", "d64"),
    ("bfloat16", 4, 1, 128, True, "", "d128"), ("float16", 6, 3, 128, False, "seqlens_k", "d128"),
    ("float16", 4, 4, 128, True, "seqlens_k", "d128"), ("bfloat16", 8, 4, 64, False, "", "d64"),
    ("float16", 8, 2, 64, True, "key_mask", "d64"), ("bfloat16", 4, 1, 128, False, "key_mask", "d128"),
    ("float16", 6, 3, 128, True, "key_mask", "d128"), ("bfloat16", 8, 2, 64, True, "key_mask", "wgmma_d64"),
    ("float16", 4, 1, 128, False, "key_mask", "wgmma_d128"), ("float16", 6, 3, 128, True, "key_mask", "wgmma_d128_s3"),
    ("float16", 8, 2, 64, True, "seqlens_k", "wgmma_d64"), ("bfloat16", 4, 1, 128, True, "", "wgmma_d128"),
    ("float16", 6, 3, 128, False, "seqlens_k", "wgmma_d128_s3"), ("bfloat16", 8, 8, 64, False, "", "wgmma_d64"),
    ("float16", 8, 2, 64, True, "key_mask", "decode_d64"), ("bfloat16", 32, 8, 128, True, "", "decode_d128"),
    ("float16", 6, 3, 128, False, "seqlens_k", "decode_d128"), ("bfloat16", 4, 1, 64, True, "", "decode_d64"),
]


@pytest.mark.parametrize("case", ATTN_CASES, ids=lambda c: "-".join(map(str, c)))
def test_attention_plugin(case):
    from qcompiler.plugins import aot, launch
    from qcompiler.plugins.flash_attention import flash_attention_reference

    dtype, HQ, HKV, D, causal, masking, tactic = case
    kern = aot.build(aot.FlashAttentionPlugin(dtype, HQ, HKV, D, causal, 0.0, masking == "seqlens_k", tactic,
                                              has_key_mask=masking == "key_mask"))
    torch.manual_seed(HQ * D)
    for B, SQ, SK in ((2, 97, 97), (1, 1025, 1025), (3, 5, 200), (4, 130, 130)):
        q = torch.randn(B, HQ, SQ, D, device="cuda", dtype=DT[dtype])
        k = torch.randn(B, HKV, SK, D, device="cuda", dtype=DT[dtype])
        v = torch.randn(B, HKV, SK, D, device="cuda", dtype=DT[dtype])
        lens = torch.randint(1, SK + 1, (B,), device="cuda", dtype=torch.int32) if masking == "seqlens_k" else None
        keep = key_padding(B, SK, first=SQ) if masking == "key_mask" else None
        o, lse = _poison(q.shape, DT[dtype]), _poison((B, HQ, SQ), torch.float32)
        launch.launch(kern, {"Q": q, "K": k, "V": v, "seqlens_k": lens, "key_mask": keep, "O": o, "LSE": lse},
                      {"B": B, "SQ": SQ, "SK": SK})
        torch.cuda.synchronize()
        ro, rl = flash_attention_reference(q, k, v, causal=causal, seqlens_k=lens, key_mask=keep)
        rows = torch.isfinite(rl)
        assert torch.equal(torch.isfinite(lse), rows)
        assert not torch.isnan(o).any()
        assert torch.all(o[~rows] == 0), "a row that sees no key must be 0"
        assert rel(o[rows], ro[rows]) < (2e-2 if dtype == "bfloat16" else 4e-3), (B, SQ, SK)
        assert torch.allclose(lse[rows], rl[rows], atol=2e-2)
