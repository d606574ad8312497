"""Triton kernels against fp32/fp64 references on awkward shapes (GPU only: ``pytest -m gpu``).

Error rule: ‖kernel - ref32‖ / ‖ref32‖ must be within a small factor of the same-precision torch
baseline's error (torch fp16 matmul / SDPA against the same fp32 reference), plus a floor.
"""

import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

from tests.plugins.cuda_kernels import key_padding  # noqa: E402 - after the importorskips


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _pack_int4(w, block, sym=True, dtype=torch.float16):
    """RTN-quantizes w [N, K] into the MatMulNBits layout; returns (b, scales, zp or None)."""
    from qcompiler.plugins.ops import pack_int4_matmulnbits

    return pack_int4_matmulnbits(w, block, symmetric=sym, scale_dtype=dtype)


@pytest.mark.parametrize("M", [1, 3, 17, 64, 300])
@pytest.mark.parametrize("K,block", [(1000, 32), (4096, 128), (520, 64), (777, 1024)])
@pytest.mark.parametrize("sym", [True, False])
def test_int4_gemm(M, K, block, sym):
    from qcompiler.plugins.int4_gemm import int4_gemm, int4_gemm_reference

    torch.manual_seed(M * 7 + K)
    N = 333
    x = torch.randn(M, K, device="cuda", dtype=torch.float16)
    w = torch.randn(N, K, device="cuda") * 0.05
    b, s, zp = _pack_int4(w, block, sym)
    bias = torch.randn(N, device="cuda", dtype=torch.float16)
    out = torch.full((M, N), float("nan"), device="cuda", dtype=torch.float16)
    out = int4_gemm(x, b, s, zp, bias, block_size=block)
    assert not torch.isnan(out).any()
    ref = int4_gemm_reference(x, b, s, zp, bias)
    base = int4_gemm_reference(x, b, s, zp, bias, compute_dtype=torch.float16)
    err, berr = rel(out, ref), rel(base, ref)
    assert err <= 2 * berr + 1e-3, (err, berr)


def _int4_extra_configs():
    from qcompiler.plugins.int4_gemm import INT4_TACTICS
    from qcompiler.plugins.int4_gemm import Int4GemmConfig as C

    extra = [C(16, 16, 512, 4, 4, KSPLIT=4), C(16, 32, 128, 4, 4, SPLIT_X=True, SCALE_AFTER=True),
             C(128, 128, 64, 8, 3, SPLIT_X=True, GROUP_M=8, PREFETCH_SCALES=False),
             C(4, 4, 1024, 4, 1, DOT=False), C(2, 8, 512, 2, 1, DOT=False),  # GEMV with several rows of x
             C(128, 128, 64, 8, 4, GROUP_M=8, SWAP_AB=True, SCALE_AFTER=True)]  # swap-AB, per-group fp32 scale
    return list(INT4_TACTICS.values()) + extra


@pytest.mark.parametrize("cfg", _int4_extra_configs(), ids=lambda c: c.describe().replace(" ", "-"))
@pytest.mark.parametrize("dtype,K,block,sym", [(torch.float16, 1000, 32, False), (torch.bfloat16, 4096, 128, True),
                                               (torch.float16, 777, 784, True)])
def test_int4_gemm_every_tactic(cfg, dtype, K, block, sym):
    """Every tactic (and the kernel's other code paths) on awkward shapes, poisoned output."""
    from qcompiler.plugins.int4_gemm import int4_gemm, int4_gemm_reference

    torch.manual_seed(K + block)
    N = 333
    w = torch.randn(N, K, device="cuda") * 0.05
    b, s, zp = _pack_int4(w, block, sym, dtype)
    bias = torch.randn(N, device="cuda", dtype=dtype)
    for M in (1, 17, 130):
        x = torch.randn(M, K, device="cuda", dtype=dtype)
        torch.cuda.empty_cache()
        out = int4_gemm(x, b, s, zp, bias, block_size=block, config=cfg)
        assert not torch.isnan(out).any()
        ref = int4_gemm_reference(x, b, s, zp, bias)
        base = int4_gemm_reference(x, b, s, zp, bias, compute_dtype=dtype)
        err, berr = rel(out, ref), rel(base, ref)
        assert err <= 2 * berr + 1e-3, (M, err, berr)


@pytest.mark.parametrize("dtype,K,block,sym", [(torch.float16, 1000, 32, False), (torch.bfloat16, 777, 784, True)])
def test_int4_gemm_dequant_matmul(dtype, K, block, sym):
    """The two-kernel path: its dense weight equals the reference dequantization bit for bit."""
    from qcompiler.plugins.int4_gemm import dequantize_int4, dequantize_int4_gpu, int4_gemm_dequant_matmul, int4_gemm_reference

    torch.manual_seed(K)
    N, M = 333, 300
    b, s, zp = _pack_int4(torch.randn(N, K, device="cuda") * 0.05, block, sym, dtype)
    w = dequantize_int4_gpu(b, s, zp, dtype)
    assert torch.equal(w[:, :K], dequantize_int4(b, s.to(dtype), zp, K, dtype))
    x = torch.randn(M, K, device="cuda", dtype=dtype)
    bias = torch.randn(N, device="cuda", dtype=dtype)
    out = int4_gemm_dequant_matmul(x, b, s, zp, bias, block_size=block)
    ref = int4_gemm_reference(x, b, s, zp, bias)
    base = int4_gemm_reference(x, b, s, zp, bias, compute_dtype=dtype)
    assert rel(out, ref) <= 2 * rel(base, ref) + 1e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scale", [False, True])
def test_int4_dequant_asm_bit_exact(dtype, scale):
    """The inline-PTX nibble dequantization equals the plain-Triton one bit for bit, on every byte."""
    import triton
    import triton.language as tl

    from qcompiler.plugins.int4_gemm import MAGIC, _dequant

    @triton.jit
    def kernel(P, Z, S, LO, HI, SCALE: tl.constexpr, USE_ASM: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        p = tl.load(P + offs)
        z = tl.load(Z + offs)
        s = tl.load(S + offs)
        lo, hi = _dequant(p, z, s, Z.dtype.element_ty, SCALE, USE_ASM)
        tl.store(LO + offs, lo)
        tl.store(HI + offs, hi)

    torch.manual_seed(5)
    n = 256 * 16
    p = torch.arange(256, device="cuda", dtype=torch.uint8).repeat(16)[torch.randperm(n, device="cuda")]
    z = (torch.randint(0, 16, (n,), device="cuda").float() + MAGIC[dtype]).to(dtype)
    sc = (torch.rand(n, device="cuda") * 0.1).to(dtype)
    outs = []
    for use_asm in (True, False):
        lo, hi = torch.empty(n, device="cuda", dtype=dtype), torch.empty(n, device="cuda", dtype=dtype)
        kernel[(1,)](p, z, sc, lo, hi, SCALE=scale, USE_ASM=use_asm, BLOCK=n)
        outs.append((lo, hi))
    q_lo, q_hi = (p & 0xF).float(), (p >> 4).float()
    zp = z.float() - MAGIC[dtype]
    exp_lo, exp_hi = ((q_lo - zp) * (sc.float() if scale else 1)).to(dtype), ((q_hi - zp) * (sc.float() if scale else 1)).to(dtype)
    for lo, hi in outs:
        assert torch.equal(lo.view(torch.int16), exp_lo.view(torch.int16))
        assert torch.equal(hi.view(torch.int16), exp_hi.view(torch.int16))


@pytest.mark.parametrize("M", [1, 17, 1025])
@pytest.mark.parametrize("N,K", [(333, 1000), (4096, 4096), (257, 72)])
def test_w8a8_gemm(M, N, K):
    from qcompiler.plugins.w8a8_gemm import w8a8_gemm, w8a8_gemm_reference

    torch.manual_seed(M + N + K)
    a = torch.randint(-127, 128, (M, K), device="cuda", dtype=torch.int8)
    b = torch.randint(-127, 128, (N, K), device="cuda", dtype=torch.int8)
    sa = torch.rand(M, device="cuda") * 0.01
    sb = torch.rand(N, device="cuda") * 0.01
    bias = torch.randn(N, device="cuda", dtype=torch.float16)
    out = w8a8_gemm(a, b, sa, sb, bias)
    ref = w8a8_gemm_reference(a, b, sa, sb, bias)
    # int32 accumulation is exact: only the final fp16 rounding may differ.
    assert rel(out, ref) < 1e-3


@pytest.mark.parametrize("norm", [0, 1, 2])
@pytest.mark.parametrize("M,H", [(1, 4096), (97, 1000), (3, 11008)])
def test_quantize_per_token(norm, M, H):
    from qcompiler.plugins.quantize_per_token import quantize_per_token, quantize_per_token_reference

    torch.manual_seed(M + H)
    x = torch.randn(M, H, device="cuda", dtype=torch.float16) * 3
    g = torch.rand(H, device="cuda", dtype=torch.float16) + 0.5
    bt = torch.randn(H, device="cuda", dtype=torch.float16) * 0.1
    q, s = quantize_per_token(x, g, bt, norm=norm, eps=1e-5)
    qr, sr = quantize_per_token_reference(x, g, bt, norm=norm, eps=1e-5)
    assert torch.allclose(s, sr, rtol=1e-4)
    # a value sitting on a rounding boundary may go either way in fp32: at most one step, rarely.
    d = (q.int() - qr.int()).abs()
    assert d.max() <= 1 and (d > 0).float().mean() < 1e-3


def _attn_case(B, HQ, HKV, SQ, SK, D, dtype):
    q = torch.randn(B, HQ, SQ, D, device="cuda", dtype=dtype)
    k = torch.randn(B, HKV, SK, D, device="cuda", dtype=dtype)
    v = torch.randn(B, HKV, SK, D, device="cuda", dtype=dtype)
    return q, k, v


def _baseline(q, k, v, causal, lens=None):
    """Same-precision torch attention (SDPA math in q's dtype) for the error baseline."""
    from qcompiler.plugins.flash_attention import flash_attention_reference

    return flash_attention_reference(q, k, v, causal=causal, seqlens_k=lens, dtype=q.dtype)[0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("SQ,SK,HQ,HKV", [(97, 97, 4, 4), (1025, 1025, 4, 1), (1, 300, 8, 2), (200, 77, 6, 3)])
def test_flash_attention_dense(dtype, D, causal, SQ, SK, HQ, HKV):
    from qcompiler.plugins.flash_attention import flash_attention, flash_attention_reference

    torch.manual_seed(SQ + SK + D)
    q, k, v = _attn_case(2, HQ, HKV, SQ, SK, D, dtype)
    o, lse = flash_attention(q, k, v, causal=causal)
    ro, rlse = flash_attention_reference(q, k, v, causal=causal)
    rows = torch.isfinite(rlse)
    assert torch.equal(torch.isfinite(lse), rows)
    err, berr = rel(o[rows], ro[rows]), rel(_baseline(q, k, v, causal)[rows], ro[rows])
    assert err <= 2 * berr + 1e-3, (err, berr)
    assert torch.allclose(lse[rows], rlse[rows], atol=2e-2 if dtype == torch.bfloat16 else 5e-3)
    if (~rows).any():  # rows that see no key (causal, SQ > SK): zero output
        assert (o.float()[~rows] == 0).all()


@pytest.mark.parametrize("causal", [False, True])
def test_flash_attention_padded_and_varlen(causal):
    from qcompiler.plugins.flash_attention import flash_attention, flash_attention_reference

    torch.manual_seed(3)
    B, HQ, HKV, S, D = 3, 8, 2, 257, 128
    q, k, v = _attn_case(B, HQ, HKV, S, S, D, torch.float16)
    lens = torch.tensor([257, 130, 1], device="cuda", dtype=torch.int32)
    o, lse = flash_attention(q, k, v, causal=causal, seqlens_k=lens)
    ro, rlse = flash_attention_reference(q, k, v, causal=causal, seqlens_k=lens)
    rows = torch.isfinite(rlse)
    assert rel(o[rows], ro[rows]) < 5e-3
    # varlen: pack each sequence's first len tokens (queries and keys alike)
    seqs_q = [q[b, :, : lens[b]].transpose(0, 1) for b in range(B)]
    seqs_k = [k[b, :, : lens[b]].transpose(0, 1) for b in range(B)]
    seqs_v = [v[b, :, : lens[b]].transpose(0, 1) for b in range(B)]
    cu = torch.zeros(B + 1, dtype=torch.int32, device="cuda")
    cu[1:] = torch.cumsum(lens, 0)
    vo, vlse = flash_attention(torch.cat(seqs_q), torch.cat(seqs_k), torch.cat(seqs_v), causal=causal,
                               cu_seqlens_q=cu, cu_seqlens_k=cu)
    for b in range(B):
        L = int(lens[b])
        ro_b, _ = flash_attention_reference(q[b:b + 1, :, :L], k[b:b + 1, :, :L], v[b:b + 1, :, :L], causal=causal)
        got = vo[cu[b]:cu[b + 1]].transpose(0, 1)[None]
        assert rel(got, ro_b) < 5e-3, b
        assert torch.allclose(vlse[:, cu[b]:cu[b + 1]], _lse(q, k, b, L, causal), atol=5e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("SQ,SK,HQ,HKV", [(97, 97, 4, 4), (1025, 1025, 4, 1), (1, 300, 8, 2), (200, 77, 6, 3)])
def test_flash_attention_key_mask(dtype, D, causal, SQ, SK, HQ, HKV):
    """key_mask [B, SK]: rows left-padded, right-padded (one run of kept keys: the kernel's key-range path),
    with random holes (its per-block mask path), with no key at all (every row of it: O = 0, LSE = -inf),
    and with every key. Judged like the dense case, against a same-precision baseline."""
    from qcompiler.plugins.flash_attention import flash_attention, flash_attention_reference

    torch.manual_seed(SQ * 3 + SK + D)
    q, k, v = _attn_case(5, HQ, HKV, SQ, SK, D, dtype)
    keep = key_padding(5, SK)
    o, lse = flash_attention(q, k, v, causal=causal, key_mask=keep)
    ro, rlse = flash_attention_reference(q, k, v, causal=causal, key_mask=keep)
    rows = torch.isfinite(rlse)
    assert torch.equal(torch.isfinite(lse), rows) and not rows[3].any()
    base = flash_attention_reference(q, k, v, causal=causal, key_mask=keep, dtype=dtype)[0]
    err, berr = rel(o[rows], ro[rows]), rel(base[rows], ro[rows])
    assert err <= 2 * berr + 1e-3, (err, berr)
    assert torch.allclose(lse[rows], rlse[rows], atol=2e-2 if dtype == torch.bfloat16 else 5e-3)
    assert (o.float()[~rows] == 0).all()
    with pytest.raises(ValueError, match="key_mask must be contiguous int32"):
        flash_attention(q, k, v, key_mask=keep.bool())


def _lse(q, k, b, L, causal):
    from qcompiler.plugins.flash_attention import flash_attention_reference

    return flash_attention_reference(q[b:b + 1, :, :L], k[b:b + 1, :, :L], k[b:b + 1, :, :L], causal=causal)[1][0]


def test_flash_attention_scale_and_strides():
    from qcompiler.plugins.flash_attention import flash_attention, flash_attention_reference

    torch.manual_seed(5)
    x = torch.randn(2, 97, 3, 4, 64, device="cuda", dtype=torch.float16)  # [B, S, qkv, H, D] like a fused QKV
    q, k, v = (x[:, :, i].transpose(1, 2) for i in range(3))
    o, _ = flash_attention(q, k, v, scale=0.3)
    ro, _ = flash_attention_reference(q, k, v, scale=0.3)
    assert rel(o, ro) < 5e-3
    assert not math.isnan(o.float().sum().item())
