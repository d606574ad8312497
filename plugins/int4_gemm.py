"""INT4 weight-only GEMM (W4A16): ``Y[M, N] = X[M, K] @ dequant(B)^T (+ bias)``.

The weight is in ONNX Runtime's ``com.microsoft.MatMulNBits`` layout (``ops.INT4_LAYOUT`` documents
it byte by byte): ``B`` uint8 ``[N, n_blocks, block_size // 2]``, scales ``[N, n_blocks]``, optional
packed zero points ``[N, ceil(n_blocks / 2)]`` (8 when absent), ``w = (q - zp) * scale``.

Hopper has no INT4 tensor cores, so each program loads a tile of packed bytes, splits the nibbles,
dequantizes them to the activation dtype in registers and feeds ``tl.dot`` (mma / wgmma at 16 bits).
For small M the kernel is a weight stream: the grid runs over N only and every program reads its rows
once, so the time is ``N*K/2`` bytes over memory bandwidth. For large M the same kernel is a tiled
GEMM whose B operand is dequantized on the fly; the dequant work is amortised over ``BLOCK_M`` rows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

__all__ = ["Int4GemmConfig", "int4_gemm", "int4_gemm_reference", "pick_int4_config", "INT4_TACTICS"]

logger = logging.getLogger(__name__)


@triton.jit
def _int4_gemm_kernel(
    X, B, S, ZP, BIAS,  # inputs (TensorRT AOT order: inputs, scalars, outputs)
    M, N, K, stride_xm, stride_bn, stride_sn, stride_zn, stride_ym,  # scalars
    Y,  # output
    QBLOCK: tl.constexpr,  # quantization block size along K (== padded K for per-channel)
    N_BLOCKS: tl.constexpr,  # ceil(K / QBLOCK)
    HAS_ZP: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SWAP_AB: tl.constexpr, SPLIT_X: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    DT = X.dtype.element_ty
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_j = tl.arange(0, BLOCK_K // 2)  # byte index inside the tile
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_ptrs = X + offs_m[:, None] * stride_xm + offs_k[None, :]
    b_ptrs = B + offs_n[:, None] * stride_bn + offs_j[None, :]
    # One group per tile (tile inside a quant block) or several whole groups per tile.
    SINGLE_GROUP: tl.constexpr = (N_BLOCKS == 1) or (QBLOCK % BLOCK_K == 0)
    G: tl.constexpr = 1 if SINGLE_GROUP else BLOCK_K // QBLOCK
    if SWAP_AB:  # acc = W X^T: the dequantized weight is the register A operand (no shared-memory trip)
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, stride_bn, BLOCK_K // 2):  # kb: byte offset in the packed row (k0 = 2 kb)
        k0 = 2 * kb
        kk = k0 + offs_k
        x = tl.load(x_ptrs, mask=mask_m[:, None] & (kk[None, :] < K), other=0.0)
        # Mask on the byte index against the (padded) row length, not on 2*j < K: Triton proves the
        # former constant over 16 contiguous bytes and emits 16-byte loads; the latter gave 1-byte loads
        # (0.3 TB/s). Padding bytes are valid memory and meet zero activations.
        p = tl.load(b_ptrs, mask=mask_n[:, None] & ((kb + offs_j)[None, :] < stride_bn), other=0)
        if SINGLE_GROUP:
            g = k0 // QBLOCK
            s = tl.load(S + offs_n * stride_sn + g, mask=mask_n, other=0.0).to(DT)
            if HAS_ZP:
                zb = tl.load(ZP + offs_n * stride_zn + g // 2, mask=mask_n, other=0)
                z = ((zb >> ((g % 2) * 4)) & 0xF).to(DT)
            else:
                z = tl.full((BLOCK_N,), 8.0, DT)
            s2 = s[:, None]
            z2 = z[:, None]
        else:
            offs_g = k0 // QBLOCK + tl.arange(0, G)
            gmask = mask_n[:, None] & (offs_g[None, :] < N_BLOCKS)
            s = tl.load(S + offs_n[:, None] * stride_sn + offs_g[None, :], mask=gmask, other=0.0).to(DT)
            if HAS_ZP:
                zb = tl.load(ZP + offs_n[:, None] * stride_zn + offs_g[None, :] // 2, mask=gmask, other=0)
                z = ((zb >> ((offs_g[None, :] % 2) * 4)) & 0xF).to(DT)
            else:
                z = tl.full((BLOCK_N, G), 8.0, DT)
            s2 = tl.reshape(tl.broadcast_to(s[:, :, None], (BLOCK_N, G, QBLOCK // 2)), (BLOCK_N, BLOCK_K // 2))
            z2 = tl.reshape(tl.broadcast_to(z[:, :, None], (BLOCK_N, G, QBLOCK // 2)), (BLOCK_N, BLOCK_K // 2))
        lo = ((p & 0xF).to(DT) - z2) * s2  # even k
        hi = ((p >> 4).to(DT) - z2) * s2  # odd k
        if SPLIT_X:
            # The sum over k is order-free: pair even-k weights with even-k activations instead of
            # interleaving the nibbles back; splitting x's last pair is register-local.
            xe, xo = tl.split(tl.reshape(x, (BLOCK_M, BLOCK_K // 2, 2)))
            if SWAP_AB:
                acc = tl.dot(lo, tl.trans(xe), acc)
                acc = tl.dot(hi, tl.trans(xo), acc)
            else:
                acc = tl.dot(xe, tl.trans(lo), acc)
                acc = tl.dot(xo, tl.trans(hi), acc)
        else:
            w = tl.reshape(tl.join(lo, hi), (BLOCK_N, BLOCK_K))  # [n, j, 2] -> [n, 2j + t]
            if SWAP_AB:
                acc = tl.dot(w, tl.trans(x), acc)
            else:
                acc = tl.dot(x, tl.trans(w), acc)
        x_ptrs += BLOCK_K
        b_ptrs += BLOCK_K // 2
    if SWAP_AB:
        acc = tl.trans(acc)
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y_ptrs = Y + offs_m[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(DT), mask=mask_m[:, None] & mask_n[None, :])


@dataclass(frozen=True)
class Int4GemmConfig:
    """Launch meta-parameters of the INT4 GEMM (one TensorRT tactic)."""

    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    num_warps: int
    num_stages: int
    SWAP_AB: bool = False
    SPLIT_X: bool = False

    def __post_init__(self):
        if self.BLOCK_K < 32 or self.BLOCK_K & (self.BLOCK_K - 1):
            raise ValueError(f"BLOCK_K must be a power of two >= 32, got {self.BLOCK_K}")


# Tactics by M range (upper bound inclusive). The plugin exposes each as a TensorRT tactic.
INT4_TACTICS: dict[str, Int4GemmConfig] = {  # from benchmarks/bench_int4_gemm.py --sweep (gpu_notes.md)
    "m16": Int4GemmConfig(16, 32, 256, 4, 3),
    "m16_wide_k": Int4GemmConfig(16, 32, 512, 4, 4),
    "m64": Int4GemmConfig(64, 64, 128, 4, 4),
    "m256": Int4GemmConfig(128, 128, 128, 8, 3),
    "large": Int4GemmConfig(256, 128, 64, 8, 3),
}


def pick_int4_config(M: int, N: int, K: int, block_size: int) -> Int4GemmConfig:
    """Heuristic tactic choice by M (the weight stream for decode, a tiled GEMM for prefill)."""
    if M <= 16:
        cfg = INT4_TACTICS["m16_wide_k" if N <= 4096 else "m16"]
    elif M <= 64:
        cfg = INT4_TACTICS["m64"]
    elif M <= 256 and N <= 4096:
        cfg = INT4_TACTICS["m256"]
    else:
        cfg = INT4_TACTICS["large"]
    return fit_int4_config(cfg, K, block_size)


def fit_int4_config(cfg: Int4GemmConfig, K: int, block_size: int) -> Int4GemmConfig:
    """Shrinks BLOCK_K so a tile holds whole quant blocks or sits inside one (the kernel's rule)."""
    n_blocks = -(-K // block_size)
    bk = cfg.BLOCK_K
    if n_blocks > 1 and block_size % bk != 0 and bk % block_size != 0:
        raise ValueError(f"block_size {block_size} must be a power of two (or K for per-channel)")
    bk = min(bk, max(32, triton.next_power_of_2(K)))
    return Int4GemmConfig(cfg.BLOCK_M, cfg.BLOCK_N, bk, cfg.num_warps, cfg.num_stages, cfg.SWAP_AB, cfg.SPLIT_X)


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
              bias: torch.Tensor | None = None, *, block_size: int, config: Int4GemmConfig | None = None
              ) -> torch.Tensor:
    """``X @ dequant(B)^T (+ bias)`` with B in the MatMulNBits INT4 layout.

    Args:
        x: [M, K] float16/bfloat16 activations.
        b: uint8 [N, n_blocks, block_size // 2] packed weights.
        scales: [N, n_blocks] (any float dtype; cast to x's dtype in the kernel).
        zero_points: optional uint8 [N, ceil(n_blocks / 2)], two 4-bit zero points per byte.
        bias: optional [N].
        block_size: quant block along K (16..256, power of two; or K rounded up for per-channel).
        config: launch tactic; chosen from M by :func:`pick_int4_config` when None.

    Returns:
        [M, N] tensor of x's dtype.
    """
    M, N, K = _check(x, b, scales, zero_points, bias, block_size)
    cfg = fit_int4_config(config, K, block_size) if config else pick_int4_config(M, N, K, block_size)
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0:
        return y
    grid = (triton.cdiv(N, cfg.BLOCK_N), triton.cdiv(M, cfg.BLOCK_M))
    _int4_gemm_kernel[grid](
        x, b, scales, zero_points, bias,
        M, N, K, x.stride(0), b.stride(0), scales.stride(0),
        zero_points.stride(0) if zero_points is not None else 0, y.stride(0),
        y,
        QBLOCK=block_size, N_BLOCKS=b.shape[1], HAS_ZP=zero_points is not None, HAS_BIAS=bias is not None,
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, SWAP_AB=cfg.SWAP_AB, SPLIT_X=cfg.SPLIT_X,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return y


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
