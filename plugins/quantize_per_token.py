"""Per-token symmetric int8 quantization, optionally fused with the RMSNorm / LayerNorm before it.

For each row x (length H): ``y = norm(x)`` (none, RMSNorm ``x * rsqrt(mean(x^2) + eps) * gamma`` or
LayerNorm ``(x - mean) * rsqrt(var + eps) * gamma + beta``), then ``scale = max|y| / 127``,
``q = clamp(round_half_even(y / scale), -127, 127)``. One program per row: the row is read once, the
int8 row and one float32 scale are written, so the normalized fp16 tensor never exists.
"""

from __future__ import annotations

import logging

import torch
import triton
import triton.language as tl

__all__ = ["NORM_NONE", "NORM_RMS", "NORM_LAYER", "quantize_per_token", "quantize_per_token_reference"]

logger = logging.getLogger(__name__)

NORM_NONE, NORM_RMS, NORM_LAYER = 0, 1, 2


@triton.jit
def _quantize_per_token_kernel(
    X, GAMMA, BETA,  # inputs
    M, H, stride_xm, stride_qm,  # scalars
    Q, SCALE,  # outputs
    NORM: tl.constexpr, EPS: tl.constexpr, BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_H)
    mask = offs < H
    x = tl.load(X + row * stride_xm + offs, mask=mask, other=0.0).to(tl.float32)
    if NORM == 1:
        rstd = tl.rsqrt(tl.sum(x * x, axis=0) / H + EPS)
        x = x * rstd * tl.load(GAMMA + offs, mask=mask, other=0.0).to(tl.float32)
    elif NORM == 2:
        mean = tl.sum(x, axis=0) / H
        xc = tl.where(mask, x - mean, 0.0)
        rstd = tl.rsqrt(tl.sum(xc * xc, axis=0) / H + EPS)
        x = xc * rstd * tl.load(GAMMA + offs, mask=mask, other=0.0).to(tl.float32)
        x += tl.load(BETA + offs, mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=0)
    scale = tl.maximum(amax, 1e-8) / 127.0
    q = tl.extra.cuda.libdevice.rint(x / scale)  # round half to even, like torch.round / ONNX QuantizeLinear
    q = tl.minimum(tl.maximum(q, -127.0), 127.0)
    tl.store(Q + row * stride_qm + offs, q.to(tl.int8), mask=mask)
    tl.store(SCALE + row, scale)


def quantize_per_token(x: torch.Tensor, gamma: torch.Tensor | None = None, beta: torch.Tensor | None = None,
                       *, norm: int = NORM_NONE, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantizes each row of ``x [M, H]`` to int8; returns (q int8 [M, H], scale float32 [M]).

    Args:
        x: float16/bfloat16/float32 [M, H], last dimension contiguous.
        gamma, beta: norm weight / bias [H] (gamma for NORM_RMS and NORM_LAYER, beta for NORM_LAYER).
        norm: NORM_NONE, NORM_RMS or NORM_LAYER.
        eps: the norm's epsilon (compiled in: one kernel per value).
    """
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"QuantizePerToken: x must be 2-D with a contiguous last dim, got {tuple(x.shape)}")
    M, H = x.shape
    if norm not in (NORM_NONE, NORM_RMS, NORM_LAYER):
        raise ValueError(f"QuantizePerToken: unknown norm {norm}")
    if norm != NORM_NONE and (gamma is None or gamma.shape != (H,)):
        raise ValueError(f"QuantizePerToken: gamma [{H}] is required for this norm")
    if norm == NORM_LAYER and (beta is None or beta.shape != (H,)):
        raise ValueError(f"QuantizePerToken: beta [{H}] is required for LayerNorm")
    block = triton.next_power_of_2(H)
    if block > 65536:
        raise ValueError(f"QuantizePerToken: H={H} is larger than one program's row (65536)")
    q = torch.empty((M, H), dtype=torch.int8, device=x.device)
    scale = torch.empty((M,), dtype=torch.float32, device=x.device)
    if M == 0:
        return q, scale
    warps = 4 if block <= 2048 else (8 if block <= 8192 else 16)
    _quantize_per_token_kernel[(M,)](
        x, gamma if norm != NORM_NONE else None, beta if norm == NORM_LAYER else None,
        M, H, x.stride(0), q.stride(0), q, scale,
        NORM=norm, EPS=float(eps), BLOCK_H=block, num_warps=warps,
    )
    return q, scale


def quantize_per_token_reference(x, gamma=None, beta=None, *, norm: int = NORM_NONE, eps: float = 1e-6):
    """Plain torch in float32: (q int8, scale float32)."""
    y = x.float()
    if norm == NORM_RMS:
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps) * gamma.float()
    elif norm == NORM_LAYER:
        y = torch.nn.functional.layer_norm(y, (y.shape[-1],), gamma.float(), beta.float(), eps)
    scale = y.abs().amax(-1).clamp_min(1e-8) / 127.0
    q = torch.round(y / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale
