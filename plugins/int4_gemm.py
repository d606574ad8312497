"""INT4 weight-only GEMM (W4A16): ``Y[M, N] = X[M, K] @ dequant(B)^T (+ bias)``.

The weight is in ONNX Runtime's ``com.microsoft.MatMulNBits`` layout (``ops.INT4_LAYOUT`` documents
it byte by byte): ``B`` uint8 ``[N, n_blocks, block_size // 2]``, scales ``[N, n_blocks]``, optional
packed zero points ``[N, ceil(n_blocks / 2)]`` (8 when absent), ``w = (q - zp) * scale``.

Hopper has no INT4 tensor cores, so each program streams packed bytes (16-byte cp.async), turns the
nibbles into 16-bit floats in registers and multiplies at 16 bits on the tensor cores. At 3 TB/s an
SM must turn ~26 weights per clock into operands with at most 128 thread-instructions per clock, and
the integer-to-float conversion alone runs at 16 per clock per SM. So the nibbles are never
converted: one inline-PTX block takes a 32-bit word (8 nibbles), masks the nibbles into bytes and
``prmt``-s each under the exponent byte of 1024.0 (fp16, 0x64) or 128.0 (bf16, 0x43), which is
exactly ``1024 + q`` (``128 + q``), then subtracts ``1024 + zp`` (``128 + zp``) two lanes at a time:
11 instructions for 8 weights, and ``q - zp`` is an exact small integer in fp16/bf16.

Three code paths, chosen per tactic (:class:`Int4GemmConfig`):

* ``KSPLIT > 1`` (M <= 16): a 16 x BLOCK_N output is too small to spread over warps (every warp
  would redo the whole dequantization), so each warp takes one K-slice of the tile in a batched
  ``tl.dot`` (M padded to 16); each slice lies in one quant group and its fp32 partial is scaled
  by that group's scale, so the weights are never rounded; slices are summed once at the end.
* 2-D tile (M >= 64): the scale is multiplied into the dequantized weight in the same PTX block
  (``SCALE_AFTER`` instead scales the fp32 partial per group); wgmma takes it from shared memory.
  ``SWAP_AB`` computes the tile of Y^T = W . X^T instead, so the dequantized weight is wgmma's A
  operand, read from registers (no store + async-proxy fence + CTA barrier before the MMA); Triton
  3.6 still converts it to the operand layout through a warp-local shared-memory round trip, and
  ptxas serializes the register-operand wgmmas (C7515). It won by 0-8% at 256x128 tiles and is kept
  where it measured faster (gpu_notes.md, session 5).
* ``DOT=False`` (GEMV, M = 1): CUDA-core FMAs; packed weights go from global loads straight into
  registers, with no shared memory anywhere in the K loop and no padding of M to 16 (see
  ``_gemv_step`` for the one thread mapping every tensor shares); BLOCK_M in (1, 2, 4) rows of x
  share each dequantized weight. It is issue bound (~5 instructions per weight): it wins at M = 1
  and loses to the tensor-core path from M = 4 on (gpu_notes.md, session 4).

For M <= 16 the CUDA C++ kernel of ``int4_gemm_mma.py`` (register-direct ``mma.sync`` operands, no
shared memory in the K loop) measured faster on most shapes, and for M >= 64 the CUDA C++ kernel of
``int4_gemm_wgmma.py`` (swap-AB wgmma, the dequantized weight as the register A operand, MMAs overlapped
with the next step's dequantization, which Triton 3.6 could not express) on every shape; both are
tactics of the same op (:class:`~qcompiler.plugins.int4_gemm_mma.Int4MmaConfig`,
:class:`~qcompiler.plugins.int4_gemm_wgmma.Int4WgmmaConfig`), chosen by ``pick_int4_config`` where they won.

Scales are tiny 2-byte gathers that Triton does not pipeline: they are prefetched into L2 when a
program starts and loaded one tile ahead (see the kernel). The grid is ``(cdiv(N, BLOCK_N),
cdiv(M, BLOCK_M))``, renumbered in grouped order (``GROUP_M``). There is no split-K: a TensorRT AOT
plugin launches one kernel and gets no workspace, and a cross-program K reduction would need one, so
the plugin needs nothing beyond its inputs and output. Where the wgmma kernel cannot run, the torch
wrapper instead dequantizes to a dense fp16/bf16 workspace and calls cuBLAS from M >= ``DEQUANT_MIN_M_TRITON``
(:func:`takes_dequant_path`, :func:`int4_gemm_dequant_matmul`), which measured faster than the Triton
tactics there; the plugin has no such path. Measurements: benchmarks/gpu_notes.md.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from functools import lru_cache

import torch
import triton
import triton.language as tl

from .int4_gemm_mma import INT4_MMA_TACTICS, Int4MmaConfig, supports
from .int4_gemm_wgmma import INT4_WGMMA_TACTICS, Int4WgmmaConfig
from .int4_gemm_wgmma import supports as wgmma_supports
from .launch import cuda_kernels_available, sm90a_kernels_available

CUDA_CONFIGS = (Int4MmaConfig, Int4WgmmaConfig)  # tactics written in CUDA C++, launched from their plugin PTX

__all__ = ["Int4GemmConfig", "int4_gemm", "int4_gemm_reference", "int4_gemm_dequant_matmul", "dequantize_int4",
           "dequantize_int4_gpu", "pick_int4_config", "fit_int4_config", "INT4_TACTICS",
           "takes_dequant_path", "CUDA_CONFIGS"]

logger = logging.getLogger(__name__)
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # CPU interpreter: no inline PTX

# ---------------------------------------------------------------------------------------------------------
# Nibble -> 16-bit float, 4 packed bytes (8 weights) per asm block. Inputs: $N = 4 bytes (byte i is the
# pack's element i); z (and s) = 4 fp16/bf16 values in 2 registers (element 0 in the low half). Outputs:
# lo (low nibbles = even k) in 2 registers, hi (high nibbles = odd k) in 2 registers.
# prmt selector 0x4140 builds [0x64 | b1 | 0x64 | b0]: bytes 0 and 1 of the masked word each below the
# magic exponent byte (taken from the second source, byte index 4); 0x4342 does bytes 2 and 3.
_NIB = """
.reg .b32 t0, t1, mg;
mov.b32 mg, {magic};
and.b32 t0, $4, 0x0F0F0F0F;
shr.u32 t1, $4, 4;
and.b32 t1, t1, 0x0F0F0F0F;
prmt.b32 $0, t0, mg, 0x4140;
prmt.b32 $1, t0, mg, 0x4342;
prmt.b32 $2, t1, mg, 0x4140;
prmt.b32 $3, t1, mg, 0x4342;
"""
_SUB = "{op} $0, $0, $5;\n{op} $1, $1, $6;\n{op} $2, $2, $5;\n{op} $3, $3, $6;\n"
_MUL = "{op} $0, $0, $7;\n{op} $1, $1, $8;\n{op} $2, $2, $7;\n{op} $3, $3, $8;\n"
_ASM_F16 = tl.constexpr("{" + _NIB.format(magic="0x64646464") + _SUB.format(op="sub.f16x2") + "}")
_ASM_BF16 = tl.constexpr("{" + _NIB.format(magic="0x43434343") + _SUB.format(op="sub.rn.bf16x2") + "}")
_ASM_F16_S = tl.constexpr("{" + _NIB.format(magic="0x64646464") + _SUB.format(op="sub.f16x2")
                          + _MUL.format(op="mul.rn.f16x2") + "}")
_ASM_BF16_S = tl.constexpr("{" + _NIB.format(magic="0x43434343") + _SUB.format(op="sub.rn.bf16x2")
                           + _MUL.format(op="mul.rn.bf16x2") + "}")
MAGIC = {torch.float16: 1024.0, torch.bfloat16: 128.0}  # value of the magic exponent byte with mantissa 0


@triton.jit
def _dequant(p, z, s, DT: tl.constexpr, SCALE: tl.constexpr, USE_ASM: tl.constexpr):
    """(lo, hi) of DT: (q - zp) [* s] for the low / high nibbles of p; z = MAGIC + zp (DT).

    USE_ASM=False is the same arithmetic in plain Triton ops (16-bit or + bitcast), for Triton's CPU
    interpreter, which cannot run inline PTX.
    """
    if USE_ASM:
        if DT == tl.float16:
            if SCALE:
                lo, hi = tl.inline_asm_elementwise(_ASM_F16_S, "=r,=r,=r,=r,r,r,r,r,r", [p, z, s],
                                                   dtype=(tl.float16, tl.float16), is_pure=True, pack=4)
            else:
                lo, hi = tl.inline_asm_elementwise(_ASM_F16, "=r,=r,=r,=r,r,r,r", [p, z],
                                                   dtype=(tl.float16, tl.float16), is_pure=True, pack=4)
        else:
            if SCALE:
                lo, hi = tl.inline_asm_elementwise(_ASM_BF16_S, "=r,=r,=r,=r,r,r,r,r,r", [p, z, s],
                                                   dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)
            else:
                lo, hi = tl.inline_asm_elementwise(_ASM_BF16, "=r,=r,=r,=r,r,r,r", [p, z],
                                                   dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)
    else:
        MAGIC_BITS: tl.constexpr = 0x6400 if DT == tl.float16 else 0x4300
        lo = ((p & 0xF).to(tl.int16) | MAGIC_BITS).to(DT, bitcast=True) - z
        hi = ((p >> 4).to(tl.int16) | MAGIC_BITS).to(DT, bitcast=True) - z
        if SCALE:
            lo = lo * s
            hi = hi * s
    return lo, hi


@triton.jit
def _scale_zero(S, ZP, rn, stride_sn, stride_zn, g, gmask, DT: tl.constexpr, HAS_ZP: tl.constexpr,
                MAGIC_V: tl.constexpr):
    """Scales (DT) and MAGIC + zero point (DT) of group(s) g for rows rn (g and rn broadcast together)."""
    s = tl.load(S + rn * stride_sn + g, mask=gmask, other=0.0).to(DT)
    if HAS_ZP:
        zb = tl.load(ZP + rn * stride_zn + g // 2, mask=gmask, other=0)
        z = (((zb >> ((g % 2) * 4)) & 0xF).to(tl.float32) + MAGIC_V).to(DT)
    else:
        z = tl.full(s.shape, MAGIC_V + 8.0, DT)
    return s, z


@triton.jit
def _prefetch_l2(ptrs, mask):
    """``prefetch.global.L2`` of every unmasked address (no result; kept by is_pure=False)."""
    tl.inline_asm_elementwise("{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.u32 $0, 0; }",
                              "=r,l,r", [ptrs, mask.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _gemv_row(acc, w, X, m, M, k0, K, stride_xm, BLOCK_K: tl.constexpr, MASKED: tl.constexpr):
    """acc[n, c] += sum_{k in chunk c} x[m, k] * w[n, k] for one row m of x (w: [BLOCK_N, BLOCK_K // 8, 8])."""
    kx = k0 + tl.arange(0, BLOCK_K)
    mask = (kx < K) & (m < M) if MASKED else (kx >= 0) & (m < M)
    x = tl.load(X + m * stride_xm + kx, mask=mask, other=0.0).to(tl.float32)
    return acc + tl.sum(w * tl.reshape(x, (1, BLOCK_K // 8, 8)), axis=2)


@triton.jit
def _gemv_step(acc0, acc1, acc2, acc3, X, B, S, ZP, m0, M, rn, k0, K, stride_xm, stride_bn, stride_sn, stride_zn,
               QBLOCK: tl.constexpr, N_BLOCKS: tl.constexpr, HAS_ZP: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_K: tl.constexpr, MASKED: tl.constexpr, MAGIC_V: tl.constexpr, USE_ASM: tl.constexpr):
    """One K step of the CUDA-core path for up to 4 rows of x: acc_m[n, c] += sum_k x[m, k] * w[n, k].

    Layout (the point of this path): every tensor of the step gets, from Triton's own coalescing, one
    and the same thread mapping, so nothing goes through shared memory. A thread owns 8-weight chunks
    (4 packed bytes); the 32 lanes take consecutive chunks, the warps consecutive 256-weight pieces of
    K (BLOCK_K == 256 * num_warps), and every thread holds all BLOCK_N rows of its chunk. x comes as
    8 fp16 (one 16-byte load) per chunk, shared by the rows; the scales one per chunk (contiguity 1);
    the weight bytes are capped at 4-byte vectors (max_contiguous) to match x. A 16-byte weight vector
    would need 32 x values per thread, which Triton's coalescing never assigns (16-byte cap), and the
    conversions it inserted instead (shared memory, ~10 barriers per step) made an earlier version
    latency bound at ~1 TB/s (gpu_notes.md, session 4).
    """
    DT = X.dtype.element_ty
    NCH: tl.constexpr = BLOCK_K // 8
    kb = k0 // 2 + tl.max_contiguous(tl.arange(0, BLOCK_K // 2), 4)[None, :]  # byte in the row
    if MASKED:
        p = tl.load(B + rn[:, None] * stride_bn + kb, mask=kb < stride_bn, other=0)
    else:
        p = tl.load(B + rn[:, None] * stride_bn + kb)
    p = tl.reshape(p, (p.shape[0], NCH, 4))
    g = (k0 + tl.arange(0, NCH) * 8) // QBLOCK
    # Gathered as [chunk, row] and transposed: Triton's coalescing puts lanes along the first of two
    # equally (non-)contiguous dimensions, so [row, chunk] got lanes along rows and a shared-memory
    # conversion per step; transposed, it is the weights' mapping.
    s, z = _scale_zero(S, ZP, rn[None, :], stride_sn, stride_zn, g[:, None], (g < N_BLOCKS)[:, None], DT, HAS_ZP,
                       MAGIC_V)
    s = tl.trans(s)
    z = tl.trans(z)
    # The scale goes into the 16-bit weight (as in the dequantize-then-cuBLAS path).
    lo, hi = _dequant(p, z[:, :, None], s[:, :, None], DT, True, USE_ASM)
    w = tl.reshape(tl.join(lo, hi), (p.shape[0], NCH, 8)).to(tl.float32)  # [n, c, j, 2] -> [n, c, 2j + t]
    acc0 = _gemv_row(acc0, w, X, m0, M, k0, K, stride_xm, BLOCK_K, MASKED)
    if BLOCK_M > 1:
        acc1 = _gemv_row(acc1, w, X, m0 + 1, M, k0, K, stride_xm, BLOCK_K, MASKED)
    if BLOCK_M > 2:
        acc2 = _gemv_row(acc2, w, X, m0 + 2, M, k0, K, stride_xm, BLOCK_K, MASKED)
        acc3 = _gemv_row(acc3, w, X, m0 + 3, M, k0, K, stride_xm, BLOCK_K, MASKED)
    return acc0, acc1, acc2, acc3


@triton.jit
def _gemv_store(acc, Y, BIAS, m, M, offs_n, mask_n, stride_ym, HAS_BIAS: tl.constexpr):
    out = tl.sum(acc, axis=1)
    if HAS_BIAS:
        out += tl.load(BIAS + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    tl.store(Y + m * stride_ym + offs_n, out.to(Y.dtype.element_ty), mask=mask_n & (m < M))


@triton.jit
def _int4_gemm_kernel(
    X, B, S, ZP, BIAS,  # inputs (TensorRT AOT order: inputs, scalars, outputs)
    M, N, K, stride_xm, stride_bn, stride_sn, stride_zn, stride_ym,  # scalars
    Y,  # output
    QBLOCK: tl.constexpr,  # quantization block size along K (== padded K for per-channel)
    N_BLOCKS: tl.constexpr,  # ceil(K / QBLOCK)
    HAS_ZP: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_X: tl.constexpr,  # dot even-k / odd-k halves separately instead of re-interleaving the nibbles
    SCALE_AFTER: tl.constexpr,  # integer weights, scale the fp32 partial product per quant group
    KSPLIT: tl.constexpr,  # > 1: the tile is KSPLIT K-slices stacked in a batched dot (one warp each)
    DOT: tl.constexpr,  # tensor cores (tl.dot); False: CUDA-core GEMV path (BLOCK_M 1, 2 or 4)
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no K masks, loop over K (padding bytes never read)
    MAGIC_V: tl.constexpr,  # 1024.0 (fp16) or 128.0 (bf16): see _NIB
    USE_ASM: tl.constexpr,  # False only under Triton's CPU interpreter
    PREFETCH_SCALES: tl.constexpr,  # L2 prefetch of the program's scale rows (inline PTX, so not interpreted)
    SWAP_AB: tl.constexpr,  # 2-D tile: accumulate Y^T = W . X^T (dequantized W is wgmma's register A)
):
    DT = X.dtype.element_ty
    # Grouped program order over the (N tiles, M tiles) grid: consecutive programs share weight tiles.
    num_n = tl.num_programs(0)
    num_m = tl.num_programs(1)
    pid = tl.program_id(1) * num_n + tl.program_id(0)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    # Rows of x past M are masked, not clamped to row 0: a masked row is zero-filled by cp.async without
    # a memory request (the load stays 16 bytes wide: the mask is constant along k). Clamping made the
    # 15 padding rows at M = 1 re-read row 0's lines, and that kernel ran 1.6-1.9x slower at M = 1
    # than at M = 16 (gpu_notes.md). Weight rows past N are clamped (their outputs are not stored).
    rn = tl.where(mask_n, offs_n, 0)
    k_end = K if EVEN_K else 2 * stride_bn  # padded row: k in [K, 2*stride_bn) meets x == 0

    # Scales (and zero points) are 2-byte gathers that Triton's pipeliner leaves synchronous; after
    # the L2 flush each tile's first touch went to HBM (~1 µs) and was waited for in every iteration.
    # So: (1) every scale row this program will read is prefetched into L2 once, here; (2) each
    # tile's scales are loaded one tile ahead and carried in registers (a tile past the end has
    # g >= N_BLOCKS and is masked). A prefetch distance of two made Triton 3.6 drop the cp.async
    # pipelining of the x / weight tiles, so it is one.
    if PREFETCH_SCALES:
        NB_P: tl.constexpr = triton.next_power_of_2(N_BLOCKS)
        offs_g = tl.arange(0, NB_P)
        _prefetch_l2(S + rn[:, None] * stride_sn + offs_g[None, :], offs_g[None, :] < N_BLOCKS)
        if HAS_ZP:
            _prefetch_l2(ZP + rn[:, None] * stride_zn + offs_g[None, :], offs_g[None, :] < (N_BLOCKS + 1) // 2)
    if not DOT:
        # GEMV (M <= 4): CUDA-core FMAs on weights loaded straight into registers; no shared memory and
        # no tensor-core padding of M to 16. Full K steps run unmasked, the ragged last one masked.
        m0 = pid_m * BLOCK_M
        acc0 = tl.zeros((BLOCK_N, BLOCK_K // 8), dtype=tl.float32)
        acc1 = acc0
        acc2 = acc0
        acc3 = acc0
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K or k0 + BLOCK_K <= K:  # uniform branch
                acc0, acc1, acc2, acc3 = _gemv_step(acc0, acc1, acc2, acc3, X, B, S, ZP, m0, M, rn, k0, K, stride_xm,
                                                    stride_bn, stride_sn, stride_zn, QBLOCK, N_BLOCKS, HAS_ZP,
                                                    BLOCK_M, BLOCK_K, False, MAGIC_V, USE_ASM)
            else:
                acc0, acc1, acc2, acc3 = _gemv_step(acc0, acc1, acc2, acc3, X, B, S, ZP, m0, M, rn, k0, K, stride_xm,
                                                    stride_bn, stride_sn, stride_zn, QBLOCK, N_BLOCKS, HAS_ZP,
                                                    BLOCK_M, BLOCK_K, True, MAGIC_V, USE_ASM)
        _gemv_store(acc0, Y, BIAS, m0, M, offs_n, mask_n, stride_ym, HAS_BIAS)
        if BLOCK_M > 1:
            _gemv_store(acc1, Y, BIAS, m0 + 1, M, offs_n, mask_n, stride_ym, HAS_BIAS)
        if BLOCK_M > 2:
            _gemv_store(acc2, Y, BIAS, m0 + 2, M, offs_n, mask_n, stride_ym, HAS_BIAS)
            _gemv_store(acc3, Y, BIAS, m0 + 3, M, offs_n, mask_n, stride_ym, HAS_BIAS)
        return
    if KSPLIT > 1:
        # Small M: BLOCK_M x BLOCK_N is too small an output to spread over warps without every warp
        # redoing the whole dequantization, so the warps split K instead. Slice s of a tile covers
        # k0 + s*SUB .. k0 + (s+1)*SUB, inside one quant group; the batched dot gives one partial per
        # slice, scaled by that slice's group scale, and the slices are summed once at the end.
        SUB: tl.constexpr = BLOCK_K // KSPLIT
        SUBH: tl.constexpr = SUB // 2
        offs_s = tl.arange(0, KSPLIT)
        kx = offs_s[:, None, None] * SUB + tl.arange(0, SUB)[None, None, :]
        kb = offs_s[:, None, None] * SUBH + tl.arange(0, SUBH)[None, None, :]
        x_ptrs = X + offs_m[None, :, None] * stride_xm + kx
        xmask = mask_m[None, :, None]
        b_ptrs = B + rn[None, :, None] * stride_bn + kb
        g0 = (offs_s * SUB) // QBLOCK
        s0, z0 = _scale_zero(S, ZP, rn[None, :], stride_sn, stride_zn, g0[:, None], (g0 < N_BLOCKS)[:, None],
                             DT, HAS_ZP, MAGIC_V)
        acc3 = tl.zeros((KSPLIT, BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, k_end, BLOCK_K):
            g1 = (k0 + BLOCK_K + offs_s * SUB) // QBLOCK
            s1, z1 = _scale_zero(S, ZP, rn[None, :], stride_sn, stride_zn, g1[:, None], (g1 < N_BLOCKS)[:, None],
                                 DT, HAS_ZP, MAGIC_V)
            if EVEN_K:
                x = tl.load(x_ptrs + k0, mask=xmask, other=0.0)
                p = tl.load(b_ptrs + k0 // 2)
            else:
                x = tl.load(x_ptrs + k0, mask=xmask & ((k0 + kx) < K), other=0.0)
                p = tl.load(b_ptrs + k0 // 2, mask=(k0 // 2 + kb) < stride_bn, other=0)
            lo, hi = _dequant(p, z0[:, :, None], s0[:, :, None], DT, False, USE_ASM)
            if SPLIT_X:
                xe, xo = tl.split(tl.reshape(x, (KSPLIT, BLOCK_M, SUBH, 2)))
                part = tl.dot(xe, tl.permute(lo, (0, 2, 1)))
                part = tl.dot(xo, tl.permute(hi, (0, 2, 1)), part)
            else:
                w = tl.reshape(tl.join(lo, hi), (KSPLIT, BLOCK_N, SUB))
                part = tl.dot(x, tl.permute(w, (0, 2, 1)))
            acc3 += part * s0.to(tl.float32)[:, None, :]
            s0, z0 = s1, z1
        acc = tl.sum(acc3, axis=0)
    else:
        # One quant group per tile (fit_int4_config keeps BLOCK_K <= block_size here).
        SUBH: tl.constexpr = BLOCK_K // 2
        SCALE_IN: tl.constexpr = not SCALE_AFTER  # fold the scale into the dequantized weight
        offs_k = tl.arange(0, BLOCK_K)
        offs_j = tl.arange(0, SUBH)  # byte index inside a tile
        x_ptrs = X + offs_m[:, None] * stride_xm + offs_k[None, :]
        xmask = mask_m[:, None]
        b_ptrs = B + rn[:, None] * stride_bn + offs_j[None, :]
        g0 = rn * 0
        s0, z0 = _scale_zero(S, ZP, rn, stride_sn, stride_zn, g0, g0 < N_BLOCKS, DT, HAS_ZP, MAGIC_V)
        if SWAP_AB:
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # Y^T tile
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, k_end, BLOCK_K):
            g1 = (k0 + BLOCK_K) // QBLOCK
            s1, z1 = _scale_zero(S, ZP, rn, stride_sn, stride_zn, g1, g1 < N_BLOCKS, DT, HAS_ZP, MAGIC_V)
            if EVEN_K:
                x = tl.load(x_ptrs + k0, mask=xmask, other=0.0)
                p = tl.load(b_ptrs + k0 // 2)
            else:
                x = tl.load(x_ptrs + k0, mask=xmask & ((k0 + offs_k)[None, :] < K), other=0.0)
                # Mask on the byte index against the padded row length: constant over 16 contiguous
                # bytes, so the load stays 16 bytes wide (a mask on 2*j < K gave 1-byte loads).
                p = tl.load(b_ptrs + k0 // 2, mask=(k0 // 2 + offs_j)[None, :] < stride_bn, other=0)
            lo, hi = _dequant(p, z0[:, None], s0[:, None], DT, SCALE_IN, USE_ASM)
            if SWAP_AB:
                part = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32) if SCALE_AFTER else acc
            else:
                part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32) if SCALE_AFTER else acc
            if SWAP_AB:
                # The dequantized tile is wgmma's A operand, which Hopper reads from registers (as in
                # attention's P @ V): no shared-memory store, fence and barrier between the
                # dequantization and the MMA. x^T is the B operand, from shared memory.
                w = tl.reshape(tl.join(lo, hi), (BLOCK_N, BLOCK_K))  # [n, j, 2] -> [n, 2j + t]
                part = tl.dot(w, tl.trans(x), part)
            elif SPLIT_X:
                # The sum over k is order-free: pair even-k weights with even-k activations.
                xe, xo = tl.split(tl.reshape(x, (BLOCK_M, SUBH, 2)))
                part = tl.dot(xe, tl.trans(lo), part)
                part = tl.dot(xo, tl.trans(hi), part)
            else:
                w = tl.reshape(tl.join(lo, hi), (BLOCK_N, BLOCK_K))  # [n, j, 2] -> [n, 2j + t]
                part = tl.dot(x, tl.trans(w), part)
            if SCALE_AFTER:
                acc += part * (s0.to(tl.float32)[:, None] if SWAP_AB else s0.to(tl.float32)[None, :])
            else:
                acc = part
            s0, z0 = s1, z1
        if SWAP_AB:
            acc = tl.trans(acc)
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y_ptrs = Y + offs_m[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(DT), mask=mask_m[:, None] & mask_n[None, :])


@dataclass(frozen=True)
class Int4GemmConfig:
    """Launch meta-parameters of the INT4 GEMM (one TensorRT tactic).

    Attributes:
        BLOCK_M, BLOCK_N, BLOCK_K: output tile and K step (BLOCK_K a power of two >= 16).
        num_warps, num_stages: Triton launch / software-pipelining depth.
        SPLIT_X: tensor-core path: two dots (even k, odd k) instead of re-interleaving the nibbles.
        SCALE_AFTER: integer weights into the dot, scale applied to the fp32 partial per group
            (always on for KSPLIT > 1; the CUDA-core path folds the scale into the weight instead).
        KSPLIT: > 1 splits each K tile into KSPLIT slices, one per warp, in a batched dot (small M).
        DOT: False selects the CUDA-core GEMV path (fp32 partials per 8-weight chunk), BLOCK_M 1, 2 or 4;
            BLOCK_K == 256 * num_warps keeps every tensor of a step in one thread mapping (_gemv_step).
        GROUP_M: grouped program order (1: plain row-major order of tiles).
        PREFETCH_SCALES: prefetch the program's scale (and zero-point) rows into L2 at the start.
        SWAP_AB: 2-D tile path only: compute the tile of Y^T = W . X^T, so the dequantized weight is
            wgmma's A operand taken from registers and x^T its B operand from shared memory (the
            accumulator is transposed in the epilogue). Excludes SPLIT_X.
    """

    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    num_warps: int
    num_stages: int
    SPLIT_X: bool = False
    SCALE_AFTER: bool = False
    KSPLIT: int = 1
    DOT: bool = True
    GROUP_M: int = 1
    PREFETCH_SCALES: bool = True
    SWAP_AB: bool = False

    def __post_init__(self):
        if self.BLOCK_K < 16 or self.BLOCK_K & (self.BLOCK_K - 1):
            raise ValueError(f"BLOCK_K must be a power of two >= 16, got {self.BLOCK_K}")
        if self.KSPLIT < 1 or self.KSPLIT & (self.KSPLIT - 1) or self.BLOCK_K // self.KSPLIT < 16:
            raise ValueError(f"KSPLIT must be a power of two with BLOCK_K / KSPLIT >= 16, got {self.KSPLIT}")
        if self.DOT and (self.BLOCK_M < 16 or self.BLOCK_N < 16):
            raise ValueError("the tensor-core path needs BLOCK_M, BLOCK_N >= 16")
        if not self.DOT and (self.BLOCK_M not in (1, 2, 4) or self.KSPLIT != 1 or self.BLOCK_K < 32):
            raise ValueError("the CUDA-core path takes BLOCK_M in (1, 2, 4), KSPLIT == 1, BLOCK_K >= 32")
        if self.SWAP_AB and (not self.DOT or self.KSPLIT != 1 or self.SPLIT_X):
            raise ValueError("SWAP_AB is a 2-D tile option: DOT, KSPLIT == 1 and no SPLIT_X")

    def describe(self) -> str:
        flags = "".join(f" {n}" for n, on in (("splitx", self.SPLIT_X), ("scale_after", self.SCALE_AFTER),
                                              (f"ksplit{self.KSPLIT}", self.KSPLIT > 1), ("fma", not self.DOT),
                                              ("swapab", self.SWAP_AB)) if on)
        g = f" g{self.GROUP_M}" if self.GROUP_M > 1 else ""
        g += "" if self.PREFETCH_SCALES else " nopf"
        return f"{self.BLOCK_M}x{self.BLOCK_N}x{self.BLOCK_K} w{self.num_warps} s{self.num_stages}{g}{flags}"


# The TensorRT tactics: TensorRT's autotuner times every one for each optimisation profile and keeps
# the fastest, so the table holds each candidate that won somewhere in the sweeps (gpu_notes.md).
# pick_int4_config is the heuristic the torch wrapper uses instead.
INT4_TACTICS: dict[str, Int4GemmConfig] = {
    "m16": Int4GemmConfig(16, 16, 512, 4, 3, SPLIT_X=True, KSPLIT=4),
    "m16_n32": Int4GemmConfig(16, 32, 512, 4, 3, SPLIT_X=True, KSPLIT=4),
    "m16_n64": Int4GemmConfig(16, 64, 512, 4, 3, SPLIT_X=True, KSPLIT=4),
    "m16_k8": Int4GemmConfig(16, 32, 1024, 8, 3, SPLIT_X=True, KSPLIT=8),
    "gemv": Int4GemmConfig(1, 8, 1024, 4, 1, DOT=False),
    "gemv_n4": Int4GemmConfig(1, 4, 1024, 4, 1, DOT=False),
    "m64": Int4GemmConfig(64, 64, 128, 4, 4),
    "m256": Int4GemmConfig(128, 128, 64, 8, 4, GROUP_M=8),
    "large": Int4GemmConfig(256, 128, 64, 8, 3, SPLIT_X=True, GROUP_M=8),
    # Swap-AB (session 5): the tile of Y^T = W . X^T, BLOCK_M tokens (wgmma's N) x BLOCK_N weight rows (its
    # register A operand). Each won at least one M >= 256 point of the session-5 table, by 3-14%.
    "swap_64x64": Int4GemmConfig(64, 64, 128, 4, 4, SWAP_AB=True),
    "swap_128x64_w4": Int4GemmConfig(128, 64, 64, 4, 4, GROUP_M=8, SWAP_AB=True),
    "swap_256x128": Int4GemmConfig(256, 128, 64, 8, 3, GROUP_M=8, SWAP_AB=True),
}


# The torch wrapper's two-kernel path (dequantize to fp16, then cuBLAS) is taken only without the wgmma kernel (no
# sm_90, NVRTC or CuPy, or a weight it does not take), from DEQUANT_MIN_M_TRITON on: there it beat every Triton
# tactic on all four benchmark shapes (session 5). The warp-specialised wgmma kernel beat it at M = 1024 on all four
# and at M = 4096 on three (0.94-1.00x fp16 against 0.89-0.98x, session 9).
DEQUANT_MIN_M_TRITON = 1024


def _wgmma_tactic(M: int, N: int, K: int, block_size: int) -> Int4WgmmaConfig | None:
    """The wgmma tactic for M >= 64 where it can run, else None (session 7 sweep: 128x256 won every M >= 1024
    point and M = 256 on N > 4096; on N <= 4096 below M = 1024 the grid of 64-row tiles leaves SMs idle, and
    two multiplying warpgroups along K won (session 10: 1.03x / 1.07x fp16 at M = 256, against 0.84x / 1.01x
    for wgmma_64x128); 64 x 64 at M = 64)."""
    if M < 64 or not torch.cuda.is_available() or not sm90a_kernels_available(torch.cuda.current_device()):
        return None
    if M == 64:
        name = "wgmma_64x64"
    else:
        name = "wgmma_64x128_k2" if M < 1024 and N <= 4096 else "wgmma_128x256"
    cfg = INT4_WGMMA_TACTICS[name]
    return cfg if wgmma_supports(cfg, N, K, block_size) else None


def takes_dequant_path(M: int, N: int, K: int, block_size: int) -> bool:
    """Whether the torch wrapper's default (config=None) dequantizes to a dense workspace and calls cuBLAS."""
    return M >= DEQUANT_MIN_M_TRITON and _wgmma_tactic(M, N, K, block_size) is None


def pick_int4_config(M: int, N: int, K: int, block_size: int) -> Int4GemmConfig | Int4MmaConfig | Int4WgmmaConfig:
    """Heuristic tactic by M and weight shape (the torch wrapper's choice).

    Fitted to the H100 measurements in benchmarks/gpu_notes.md (M <= 16: session 14, the CUDA C++ kernel
    where it won, else sessions 3-4; M < 64: the second pass's run 2; M >= 64: session 7's wgmma kernel
    where it can run, else session 5); TensorRT times every tactic instead.
    """
    small_n = N <= 4096
    if M <= 16:
        large = N * K >= 1 << 27  # session 14: Triton's m16 tactics still win M = 16 on the largest weights
        if M <= 8 or not large:
            mma = INT4_MMA_TACTICS["mma_n32_w16_sw" if small_n or large else "mma_n32_w4_sw"]
            if supports(mma, N, K, block_size) and cuda_kernels_available():
                return mma
        if M == 1:  # the GEMV won or tied every M = 1 point of the session-4 sweep
            name = "gemv"
        else:
            name = "m16" if small_n else "m16_n32"
    elif M <= 64:
        wgmma = _wgmma_tactic(M, N, K, block_size) if M == 64 and not small_n else None
        if wgmma is not None:  # session 7: 1.28-1.67x fp16 at M = 64 on N > 4096, against 1.27-1.37x for m64
            return wgmma
        name = "m16_n64" if small_n else "m64"
    else:
        wgmma = _wgmma_tactic(M, N, K, block_size)
        if wgmma is not None:
            return wgmma
        if M < DEQUANT_MIN_M_TRITON:  # session 5 (M = 256): swap-AB won or tied on all four shapes
            name = "swap_64x64" if small_n else ("swap_256x128" if N * K >= 1 << 27 else "swap_128x64_w4")
        else:  # beat "large" at 5 of 6 M >= 1024 points (session 5); the wrapper takes dq+cuBLAS there
            name = "swap_256x128"
    return fit_int4_config(INT4_TACTICS[name], K, block_size)


def fit_int4_config(cfg: Int4GemmConfig, K: int, block_size: int) -> Int4GemmConfig:
    """Adapts a tactic to (K, block_size) so every tile / K-slice lies inside one quant group.

    BLOCK_K shrinks to at most the next power of two of K. With several groups per row, a 2-D tile
    holds at most one group (BLOCK_K <= block_size) and a KSPLIT slice likewise (BLOCK_K <= KSPLIT *
    block_size); then BLOCK_K is halved while that makes it divide K (so K = 11008 takes the unmasked
    loop with 256, not the masked one with 512), keeping >= 32 per slice. SPLIT_X needs halves of
    >= 16 elements.
    """
    n_blocks = -(-K // block_size)
    bk = cfg.BLOCK_K
    if n_blocks > 1 and block_size % bk != 0 and bk % block_size != 0:
        raise ValueError(f"block_size {block_size} must be a power of two (or K for per-channel)")
    if not cfg.DOT:  # 8-weight chunks never straddle a group (>= 16); the K tail is one masked step
        return replace(cfg, BLOCK_K=min(bk, max(32, triton.next_power_of_2(K))))
    bk = min(bk, max(16, triton.next_power_of_2(K)))
    if n_blocks > 1:
        bk = min(bk, cfg.KSPLIT * block_size)
    ksplit = cfg.KSPLIT
    cand = bk
    while K % cand and cand // 2 >= max(32, 32 * ksplit):
        cand //= 2
    if K % cand == 0:
        bk = cand
    while ksplit > 1 and bk // ksplit < 16:
        ksplit //= 2
    sub = bk // ksplit
    split_x = cfg.SPLIT_X and sub >= 32
    return replace(cfg, BLOCK_K=bk, KSPLIT=ksplit, SPLIT_X=split_x)


def kernel_constexprs(cfg: Int4GemmConfig, K: int, block_size: int, dtype: torch.dtype, has_zp: bool,
                      has_bias: bool) -> dict:
    """The kernel's compile-time arguments for a fitted config (shared by the wrapper and the AOT build)."""
    if dtype not in MAGIC:
        raise ValueError(f"Int4Gemm: activations must be float16/bfloat16, got {dtype}")
    return dict(QBLOCK=block_size, N_BLOCKS=-(-K // block_size), HAS_ZP=has_zp, HAS_BIAS=has_bias,
                BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, SPLIT_X=cfg.SPLIT_X,
                SCALE_AFTER=cfg.SCALE_AFTER, KSPLIT=cfg.KSPLIT, DOT=cfg.DOT, GROUP_M=cfg.GROUP_M,
                EVEN_K=K % cfg.BLOCK_K == 0, MAGIC_V=MAGIC[dtype], USE_ASM=True,
                PREFETCH_SCALES=cfg.PREFETCH_SCALES, SWAP_AB=cfg.SWAP_AB)


def _check(x, b, scales, zero_points, bias, block_size):
    if x.dim() != 2:
        raise ValueError(f"Int4Gemm: X must be 2-D [M, K], got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"Int4Gemm: X must be float16/bfloat16, got {x.dtype}")
    M, K = x.shape
    if b.dtype != torch.uint8 or b.dim() != 3:
        raise ValueError(f"Int4Gemm: B must be uint8 [N, n_blocks, block_size/2], got {b.dtype} {tuple(b.shape)}")
    N, n_blocks, half = b.shape
    if half * 2 != block_size or n_blocks != -(-K // block_size):
        raise ValueError(f"Int4Gemm: B shape {tuple(b.shape)} does not match K={K}, block_size={block_size}")
    if scales.shape != (N, n_blocks):
        raise ValueError(f"Int4Gemm: scales must be [{N}, {n_blocks}], got {tuple(scales.shape)}")
    if zero_points is not None and (zero_points.dtype != torch.uint8 or zero_points.shape != (N, (n_blocks + 1) // 2)):
        raise ValueError(f"Int4Gemm: zero_points must be uint8 [{N}, {(n_blocks + 1) // 2}]")
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"Int4Gemm: bias must be [{N}], got {tuple(bias.shape)}")
    for name, t in (("X", x), ("B", b), ("scales", scales), ("zero_points", zero_points), ("bias", bias)):
        if t is not None and (t.device != x.device or t.stride(-1) != 1):
            raise ValueError(f"Int4Gemm: {name} must be on {x.device} with a contiguous last dimension")
    if not b.is_contiguous():
        raise ValueError("Int4Gemm: B must be contiguous")
    return M, N, K


def int4_gemm(x: torch.Tensor, b: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None = None,
              bias: torch.Tensor | None = None, *, block_size: int,
              config: Int4GemmConfig | Int4MmaConfig | Int4WgmmaConfig | None = None,
              programmatic_launch: bool = False) -> torch.Tensor:
    """``X @ dequant(B)^T (+ bias)`` with B in the MatMulNBits INT4 layout.

    Args:
        x: [M, K] float16/bfloat16 activations.
        b: uint8 [N, n_blocks, block_size // 2] packed weights.
        scales: [N, n_blocks] (any float dtype; read as fp32 / x's dtype in the kernel).
        zero_points: optional uint8 [N, ceil(n_blocks / 2)], two 4-bit zero points per byte.
        bias: optional [N].
        block_size: quant block along K (16..256, power of two; or K rounded up for per-channel).
        config: launch tactic: an Int4GemmConfig of the Triton kernel, or an Int4MmaConfig /
            Int4WgmmaConfig of a CUDA C++ kernel (int4_gemm_mma.py, int4_gemm_wgmma.py; launched from its
            plugin PTX through CuPy). When None: where :func:`takes_dequant_path` says so, the two-kernel
            path :func:`int4_gemm_dequant_matmul` (faster there, measured), otherwise the fused kernel with
            :func:`pick_int4_config`'s tactic.
        programmatic_launch: launch with programmatic stream serialization (PDL), so that back-to-back calls overlap
            one's start with the previous one's end; only for a kernel whose PTX waits for the grid before it
            (``AotKernel.programmatic``: the mma kernel, int4_gemm_mma.py).

    Returns:
        [M, N] tensor of x's dtype.

    Raises:
        ValueError: bad shapes or dtypes, or ``programmatic_launch`` on a path that is not a programmatic plugin
            kernel.
    """
    M, N, K = _check(x, b, scales, zero_points, bias, block_size)
    if config is None:
        if takes_dequant_path(M, N, K, block_size) and not programmatic_launch:
            return int4_gemm_dequant_matmul(x, b, scales, zero_points, bias, block_size=block_size)
        cfg = pick_int4_config(M, N, K, block_size)
    else:
        cfg = config if isinstance(config, CUDA_CONFIGS) else fit_int4_config(config, K, block_size)
    if isinstance(cfg, CUDA_CONFIGS):
        return _int4_gemm_cuda(x, b, scales, zero_points, bias, block_size, cfg, programmatic_launch)
    if programmatic_launch:  # Triton's launcher sets no launch attributes
        raise ValueError(f"Int4Gemm: programmatic_launch needs a CUDA C++ plugin kernel, got {cfg}")
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0:
        return y
    grid = (triton.cdiv(N, cfg.BLOCK_N), triton.cdiv(M, cfg.BLOCK_M))
    _int4_gemm_kernel[grid](
        x, b, scales, zero_points, bias,
        M, N, K, x.stride(0), b.stride(0), scales.stride(0),
        zero_points.stride(0) if zero_points is not None else 0, y.stride(0),
        y,
        **{**kernel_constexprs(cfg, K, block_size, x.dtype, zero_points is not None, bias is not None),
           "USE_ASM": not _INTERPRET, "PREFETCH_SCALES": cfg.PREFETCH_SCALES and not _INTERPRET},
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return y


@lru_cache(maxsize=256)
def _cuda_kernel(dtype: str, N: int, K: int, block_size: int, has_zp: bool, has_bias: bool, cfg):
    from .aot import Int4GemmPlugin, build_int4_cuda

    return build_int4_cuda(Int4GemmPlugin(dtype, N, K, block_size, has_zp, has_bias), cfg)


def _int4_gemm_cuda(x, b, scales, zero_points, bias, block_size: int, cfg, programmatic: bool) -> torch.Tensor:
    """A CUDA C++ tactic (int4_gemm_mma.py, int4_gemm_wgmma.py): the plugin's own PTX, launched as the plugin
    would be."""
    from .launch import launch

    M, K = x.shape
    N = b.shape[0]
    kernel = _cuda_kernel(str(x.dtype).removeprefix("torch."), N, K, block_size, zero_points is not None,
                         bias is not None, cfg)
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    tensors = {"X": x.contiguous(), "B": b, "scales": scales.to(x.dtype).contiguous(), "zero_points": zero_points,
               "bias": None if bias is None else bias.to(x.dtype).contiguous(), "Y": y}
    launch(kernel, tensors, {"M": M}, programmatic=programmatic)
    return y


@triton.jit
def _int4_dequant_kernel(B, S, ZP, W, N, stride_bn, stride_sn, stride_zn, stride_wn,
                         QBLOCK: tl.constexpr, N_BLOCKS: tl.constexpr, HAS_ZP: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, MAGIC_V: tl.constexpr, USE_ASM: tl.constexpr):
    """W[n, k] = (q - zp) * scale in W's dtype, for k over the padded row (2 * stride_bn)."""
    DT = W.dtype.element_ty
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    rn = tl.where(mask_n, offs_n, 0)
    offs_j = tl.program_id(1) * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
    mask_j = offs_j < stride_bn
    p = tl.load(B + rn[:, None] * stride_bn + offs_j[None, :], mask=mask_j[None, :], other=0)
    g = (2 * offs_j) // QBLOCK  # per element: a tile may span several small groups
    s, z = _scale_zero(S, ZP, rn[:, None], stride_sn, stride_zn, g[None, :], (g < N_BLOCKS)[None, :], DT, HAS_ZP,
                       MAGIC_V)
    lo, hi = _dequant(p, z, s, DT, True, USE_ASM)
    w = tl.reshape(tl.join(lo, hi), (BLOCK_N, BLOCK_K))
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    tl.store(W + offs_n[:, None] * stride_wn + offs_k[None, :], w, mask=mask_n[:, None] & (offs_k < 2 * stride_bn)[None, :])


def dequantize_int4_gpu(b: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None,
                        dtype: torch.dtype) -> torch.Tensor:
    """MatMulNBits INT4 layout -> dense ``[N, n_blocks * block_size]`` (padded K) in fp16/bf16, one Triton pass."""
    N, n_blocks, half = b.shape
    w = torch.empty((N, n_blocks * half * 2), dtype=dtype, device=b.device)
    bn, bk = 32, 256
    grid = (triton.cdiv(N, bn), triton.cdiv(n_blocks * half * 2, bk))
    _int4_dequant_kernel[grid](b, scales, zero_points, w, N, b.stride(0), scales.stride(0),
                               zero_points.stride(0) if zero_points is not None else 0, w.stride(0),
                               QBLOCK=half * 2, N_BLOCKS=n_blocks, HAS_ZP=zero_points is not None, BLOCK_N=bn,
                               BLOCK_K=bk, MAGIC_V=MAGIC[dtype], USE_ASM=not _INTERPRET, num_warps=4)
    return w


def int4_gemm_dequant_matmul(x: torch.Tensor, b: torch.Tensor, scales: torch.Tensor,
                             zero_points: torch.Tensor | None = None, bias: torch.Tensor | None = None, *,
                             block_size: int) -> torch.Tensor:
    """Two-kernel path for large M: dequantize B to a dense fp16/bf16 workspace, then cuBLAS.

    Costs one extra pass over the weight (N*K/2 bytes read, N*K*2 written and read back) and a
    workspace of N * K elements; it pays off only where the GEMM is long (large M). This is a torch
    path: a TensorRT AOT plugin launches one kernel with no workspace, so the plugin has only the
    fused kernel (see benchmarks/gpu_notes.md).
    """
    M, N, K = _check(x, b, scales, zero_points, bias, block_size)
    w = dequantize_int4_gpu(b, scales, zero_points, x.dtype)
    return torch.nn.functional.linear(x, w[:, :K], bias)


def dequantize_int4(b: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None, K: int,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """MatMulNBits INT4 layout -> dense W [N, K] (``w = (q - zp) * scale``)."""
    N, n_blocks, half = b.shape
    block = half * 2
    q = torch.stack([b & 0xF, b >> 4], dim=-1).reshape(N, n_blocks, block).to(torch.float32)
    if zero_points is None:
        zp = torch.full((N, n_blocks), 8.0, device=b.device)
    else:
        zp = torch.stack([zero_points & 0xF, zero_points >> 4], dim=-1).reshape(N, -1)[:, :n_blocks].float()
    w = (q - zp[:, :, None]) * scales.float()[:, :, None]
    return w.reshape(N, n_blocks * block)[:, :K].to(dtype)


def int4_gemm_reference(x: torch.Tensor, b: torch.Tensor, scales: torch.Tensor,
                        zero_points: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                        *, compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Plain torch reference: dequantize to ``compute_dtype`` and multiply (returns compute_dtype)."""
    w = dequantize_int4(b, scales.to(x.dtype) if compute_dtype != torch.float32 else scales, zero_points,
                        x.shape[1], compute_dtype)
    y = x.to(compute_dtype) @ w.t()
    if bias is not None:
        y = y + bias.to(compute_dtype)
    return y
