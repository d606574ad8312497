"""W8A8 GEMM: ``Y = (A_q @ B_q^T) * row_scale[:, None] * col_scale[None, :] (+ bias)``, fp16/bf16 out.

``A_q`` int8 ``[M, K]`` (per-token quantized activations, see ``quantize_per_token``), ``B_q`` int8
``[N, K]`` (per-output-channel quantized weight, K contiguous: both operands K-major, which is what
Hopper's int8 wgmma wants), int32 accumulation in the tensor cores, and the dequantization fused in
the epilogue so the int32 product never reaches device memory.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

__all__ = ["W8A8Config", "w8a8_gemm", "w8a8_gemm_reference", "pick_w8a8_config", "W8A8_TACTICS"]

logger = logging.getLogger(__name__)


@triton.jit
def _w8a8_gemm_kernel(
    A, SA, B, SB, BIAS,  # inputs, in the op's order (ops.W8A8_GEMM)
    M, N, K, stride_am, stride_bn, stride_ym,  # scalars
    Y,  # output
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    # Grouped order: GROUP_M row-tiles share each column tile while it is still in L2.
    width = GROUP_M * num_n
    group = pid // width
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Clamp rows instead of masking them: loads stay unmasked (pipelined, vectorised) in the main loop.
    rm = tl.where(offs_m < M, offs_m, 0)
    rn = tl.where(offs_n < N, offs_n, 0)
    a_ptrs = A + rm[:, None] * stride_am + offs_k[None, :]
    b_ptrs = B + rn[:, None] * stride_bn + offs_k[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        kmask = (k0 + offs_k) < K
        a = tl.load(a_ptrs, mask=kmask[None, :], other=0)
        b = tl.load(b_ptrs, mask=kmask[None, :], other=0)
        acc = tl.dot(a, tl.trans(b), acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    mask_m = offs_m < M
    mask_n = offs_n < N
    sa = tl.load(SA + offs_m, mask=mask_m, other=0.0)
    sb = tl.load(SB + offs_n, mask=mask_n, other=0.0)
    out = acc.to(tl.float32) * sa[:, None] * sb[None, :]
    if HAS_BIAS:
        out += tl.load(BIAS + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y_ptrs = Y + offs_m[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, out.to(Y.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@dataclass(frozen=True)
class W8A8Config:
    """Launch meta-parameters of the W8A8 GEMM (one TensorRT tactic)."""

    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    GROUP_M: int
    num_warps: int
    num_stages: int


# Triton 3.6 waits for every int8 wgmma before the next K step (``wgmma.wait_group 0`` in the PTX,
# where fp16 dots get ``wait_group 1``), so a lone program per SM leaves the tensor cores idle while
# it waits, loads and syncs. 128x128x128 tiles in 3 stages (96 KB of shared memory) let two programs
# share an SM and fill each other's gaps: 1.51-1.77x fp16 at M = 1024 against 1.13-1.64x for the
# previous 128x256 / 4-stage tactics (benchmarks/gpu_notes.md, session 3).
W8A8_TACTICS: dict[str, W8A8Config] = {
    "small": W8A8Config(64, 128, 128, 8, 4, 4),
    "mid": W8A8Config(128, 128, 128, 8, 8, 3),
    "large": W8A8Config(128, 128, 128, 8, 4, 3),
}


def pick_w8a8_config(M: int, N: int, K: int, num_sms: int = 132) -> W8A8Config:
    """The torch wrapper's tactic: 64-row tiles while 128x128 tiles would not cover the SMs once."""
    if M <= 64 or triton.cdiv(M, 128) * triton.cdiv(N, 128) < num_sms:
        return W8A8_TACTICS["small"]
    return W8A8_TACTICS["large"]


def w8a8_gemm(a: torch.Tensor, b: torch.Tensor, row_scale: torch.Tensor, col_scale: torch.Tensor,
              bias: torch.Tensor | None = None, *, out_dtype: torch.dtype = torch.float16,
              config: W8A8Config | None = None) -> torch.Tensor:
    """int8 ``a [M, K]`` x int8 ``b [N, K]`` -> ``out_dtype [M, N]`` with per-token x per-channel scales.

    Args:
        a: int8 [M, K], row-major.
        b: int8 [N, K], row-major (the weight as stored in ONNX MatMul's transposed form).
        row_scale: float32 [M] (per-token activation scale).
        col_scale: float32 [N] (per-output-channel weight scale).
        bias: optional [N] (float16/bfloat16/float32).
        out_dtype: float16 or bfloat16.
        config: launch tactic; chosen by :func:`pick_w8a8_config` when None.
    """
    if a.dtype != torch.int8 or b.dtype != torch.int8 or a.dim() != 2 or b.dim() != 2:
        raise ValueError(f"W8A8Gemm: A and B must be 2-D int8, got {a.dtype}{tuple(a.shape)}, {b.dtype}{tuple(b.shape)}")
    M, K = a.shape
    N, Kb = b.shape
    if Kb != K:
        raise ValueError(f"W8A8Gemm: K mismatch: A has {K}, B has {Kb}")
    if row_scale.shape != (M,) or col_scale.shape != (N,):
        raise ValueError(f"W8A8Gemm: row_scale must be [{M}] and col_scale [{N}]")
    if row_scale.dtype != torch.float32 or col_scale.dtype != torch.float32:
        raise ValueError("W8A8Gemm: scales must be float32")
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"W8A8Gemm: bias must be [{N}]")
    if out_dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"W8A8Gemm: out_dtype must be float16/bfloat16, got {out_dtype}")
    for name, t in (("A", a), ("B", b), ("row_scale", row_scale), ("col_scale", col_scale), ("bias", bias)):
        if t is not None and (t.device != a.device or t.stride(-1) != 1):
            raise ValueError(f"W8A8Gemm: {name} must be on {a.device} with a contiguous last dimension")
    num_sms = torch.cuda.get_device_properties(a.device).multi_processor_count if a.is_cuda else 132
    cfg = config or pick_w8a8_config(M, N, K, num_sms)
    y = torch.empty((M, N), dtype=out_dtype, device=a.device)
    if M == 0:
        return y
    grid = (triton.cdiv(M, cfg.BLOCK_M) * triton.cdiv(N, cfg.BLOCK_N),)
    _w8a8_gemm_kernel[grid](
        a, row_scale, b, col_scale, bias, M, N, K, a.stride(0), b.stride(0), y.stride(0), y,
        HAS_BIAS=bias is not None, BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K,
        GROUP_M=cfg.GROUP_M, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return y


def w8a8_gemm_reference(a, b, row_scale, col_scale, bias=None):
    """Exact reference in float64 (int8 products are exact in fp64 up to K ~ 2^37)."""
    y = (a.double() @ b.double().t()) * row_scale.double()[:, None] * col_scale.double()[None, :]
    if bias is not None:
        y = y + bias.double()
    return y
