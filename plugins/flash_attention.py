"""Flash attention forward (fp16/bf16, head dim 16..256 power of two; tuned for 64 and 128).

``O = softmax(scale * Q K^T + mask) V`` computed block by block with the online softmax (running row
max ``m`` and row sum ``l``; each new key block rescales the accumulator by ``exp(m_old - m_new)``), so
the S x S score matrix never reaches device memory. Also returns ``LSE = m + log(l)`` (natural log),
per query row, for a backward pass or for merging partial attentions.

Batches (``ops.ATTENTION_LAYOUTS``):
  * dense: Q [B, Hq, Sq, D], K/V [B, Hkv, Sk, D] (any strides, last dim contiguous).
  * padded: the same plus ``seqlens_k`` int32 [B]: keys at positions >= seqlens_k[b] are masked
    (a right-padded key padding mask); query rows past it are still computed.
  * key-masked: the same plus ``key_mask`` int32 [B, Sk]: key j of batch b is masked where
    ``key_mask[b, j] == 0`` (any padding, left or right, as attention masks hold it). K/V of masked
    keys are still read (unlike past seqlens_k): they must be finite.
  * varlen: Q [Tq, Hq, D], K/V [Tk, Hkv, D] packed, ``cu_seqlens_q`` / ``cu_seqlens_k`` int32 [B+1].
GQA/MQA: query head h reads kv head ``h // (Hq // Hkv)``. Causal masking is bottom-right aligned (query
i sees key j iff ``j <= i + Sk_b - Sq_b``), which equals the usual top-left mask when Sq == Sk and is
what a KV-cache decode step needs. Rows that see no key get O = 0 and LSE = -inf.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import triton
import triton.language as tl

from .flash_attention_wgmma import ATTN_WGMMA_TACTICS, AttnWgmmaConfig
from .flash_decode import AttnDecodeConfig
from .flash_decode import supports as supports_decode
from .launch import launch, sm90a_kernels_available

__all__ = ["AttnConfig", "flash_attention", "flash_attention_reference", "pick_attn_config", "ATTN_TACTICS",
           "MODE_DENSE", "MODE_PADDED", "MODE_VARLEN", "MODE_KEY_MASK"]

logger = logging.getLogger(__name__)

MODE_DENSE, MODE_PADDED, MODE_VARLEN, MODE_KEY_MASK = 0, 1, 2, 3


@triton.jit
def _attn_block(acc, l_i, m_i, q, k_ptrs, v_ptrs, km_ptrs, start, end, offs_m, offs_n, k_lo, k_len, causal_off,
                stride_ks, stride_vs, qk_scale,
                MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, KEY_MASK: tl.constexpr, BLOCK_N: tl.constexpr):
    k_ptrs += start * stride_ks
    v_ptrs += start * stride_vs
    for s in range(start, end, BLOCK_N):
        if MASKED:
            kmask = ((s + offs_n) < k_len) & ((s + offs_n) >= k_lo)
            k = tl.load(k_ptrs, mask=kmask[None, :], other=0.0)
        else:
            k = tl.load(k_ptrs)
        qk = tl.dot(q, k)
        # The key mask only masks scores: K/V of masked keys are loaded like any others (a graph computes
        # them, so they are finite and their zero probabilities add nothing), which keeps the loads unmasked.
        if KEY_MASK:
            if MASKED:
                kept = tl.load(km_ptrs + s, mask=kmask, other=0) != 0
            else:
                kept = tl.load(km_ptrs + s) != 0
        if MASKED:
            keep = kmask[None, :]
            if KEY_MASK:
                keep = keep & kept[None, :]
            if IS_CAUSAL:
                keep = keep & ((s + offs_n)[None, :] <= (offs_m[:, None] + causal_off))
            qk = tl.where(keep, qk, float("-inf"))
        elif KEY_MASK:
            qk = tl.where(kept[None, :], qk, float("-inf"))
        m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_ij[:, None])
        alpha = tl.math.exp2(m_i - m_ij)
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASKED:
            v = tl.load(v_ptrs, mask=kmask[:, None], other=0.0)
        else:
            v = tl.load(v_ptrs)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_ij
        k_ptrs += BLOCK_N * stride_ks
        v_ptrs += BLOCK_N * stride_vs
    return acc, l_i, m_i


@triton.jit
def _attn_rows(acc, l_i, m_i, q, k_ptrs, v_ptrs, km_ptrs, start_m, offs_m, offs_n, k_lo, k_hi, causal_off,
               stride_ks, stride_vs, qk_scale, IS_CAUSAL: tl.constexpr, KEY_MASK: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr):
    """One query block over the keys in [k_lo, k_hi): the blocks cut by k_lo, k_hi or the causal diagonal
    masked, those between not."""
    if IS_CAUSAL:
        hi = tl.minimum(k_hi, start_m + BLOCK_M + causal_off)
        # keys below start_m + causal_off + 1 are visible to every row of this block
        full = tl.minimum(tl.maximum(start_m + causal_off + 1, 0), k_hi) // BLOCK_N * BLOCK_N
    else:
        hi = k_hi
        full = k_hi // BLOCK_N * BLOCK_N
    hi = tl.maximum(hi, 0)
    lo = k_lo // BLOCK_N * BLOCK_N
    lo_full = tl.minimum((k_lo + BLOCK_N - 1) // BLOCK_N * BLOCK_N, hi)
    full = tl.maximum(tl.minimum(full, hi), lo_full)
    acc, l_i, m_i = _attn_block(acc, l_i, m_i, q, k_ptrs, v_ptrs, km_ptrs, lo, lo_full, offs_m, offs_n, k_lo, k_hi,
                                causal_off, stride_ks, stride_vs, qk_scale, True, IS_CAUSAL, KEY_MASK, BLOCK_N)
    acc, l_i, m_i = _attn_block(acc, l_i, m_i, q, k_ptrs, v_ptrs, km_ptrs, lo_full, full, offs_m, offs_n, k_lo, k_hi,
                                causal_off, stride_ks, stride_vs, qk_scale, False, IS_CAUSAL, KEY_MASK, BLOCK_N)
    acc, l_i, m_i = _attn_block(acc, l_i, m_i, q, k_ptrs, v_ptrs, km_ptrs, full, hi, offs_m, offs_n, k_lo, k_hi,
                                causal_off, stride_ks, stride_vs, qk_scale, True, IS_CAUSAL, KEY_MASK, BLOCK_N)
    return acc, l_i, m_i


@triton.jit
def _kept_range(row, SK, SCAN: tl.constexpr):
    """First and last kept key of a key-mask row, and how many are kept."""
    zero = tl.program_id(0) * 0  # a run-time int32 (SK may be specialised to a constant)
    first = zero + SK
    last = zero - 1
    count = zero
    for s0 in range(0, SK, SCAN):
        offs = s0 + tl.arange(0, SCAN)
        kept = tl.load(row + offs, mask=offs < SK, other=0) != 0
        first = tl.minimum(first, tl.min(tl.where(kept, offs, SK), 0))
        last = tl.maximum(last, tl.max(tl.where(kept, offs, -1), 0))
        count += tl.sum(kept.to(tl.int32), 0)
    return first, last, count


@triton.jit
def _flash_attn_fwd_kernel(
    Q, K, V, SEQ_Q, SEQ_K,  # inputs; SEQ_Q = cu_seqlens_q (varlen), SEQ_K = seqlens_k, cu_seqlens_k or key_mask
    SQ, SK, HQ,  # scalars: (max) query / key length, number of query heads
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs, stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
    O, LSE,  # outputs  # noqa: E741
    SM_SCALE: tl.constexpr, HEAD_DIM: tl.constexpr, GQA_GROUP: tl.constexpr, IS_CAUSAL: tl.constexpr,
    MODE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Longest causal rows first: pid 0 takes the last query block, so the tail of the grid is short work.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0) if IS_CAUSAL else tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HQ
    h = pid_bh % HQ
    kvh = h // GQA_GROUP
    if MODE == 2:
        q_start = tl.load(SEQ_Q + b)
        q_len = tl.load(SEQ_Q + b + 1) - q_start
        k_start = tl.load(SEQ_K + b)
        k_len = tl.load(SEQ_K + b + 1) - k_start
    elif MODE == 1:
        q_start = 0
        q_len = SQ
        k_start = 0
        k_len = tl.minimum(tl.load(SEQ_K + b), SK)
    else:  # dense, key-masked
        q_start = 0
        q_len = SQ
        k_start = 0
        k_len = SK
    start_m = pid_m * BLOCK_M
    if start_m >= q_len:
        return
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + q_start.to(tl.int64) * stride_qs
    k_base = K + b.to(tl.int64) * stride_kb + kvh.to(tl.int64) * stride_kh + k_start.to(tl.int64) * stride_ks
    v_base = V + b.to(tl.int64) * stride_vb + kvh.to(tl.int64) * stride_vh + k_start.to(tl.int64) * stride_vs
    q = tl.load(q_base + offs_m[:, None] * stride_qs + offs_d[None, :], mask=(offs_m < q_len)[:, None], other=0.0)
    k_ptrs = k_base + offs_n[None, :] * stride_ks + offs_d[:, None]  # K^T tile [D, BLOCK_N]
    v_ptrs = v_base + offs_n[:, None] * stride_vs + offs_d[None, :]
    qk_scale = SM_SCALE * 1.4426950408889634  # exp(x) = exp2(x * log2(e))
    # A finite floor instead of -inf keeps exp2(m_old - m_new) free of inf - inf for fully masked blocks.
    m_i = tl.full((BLOCK_M,), -1.0e30, tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
    causal_off = k_len - q_len
    if MODE == 3:
        row = SEQ_K + b.to(tl.int64) * SK
        first, last, count = _kept_range(row, SK, 2048)
        if count == last - first + 1:
            # One run of kept keys (left or right padding, or none): a key range, masked only at its ends,
            # and the padded key blocks skipped.
            acc, l_i, m_i = _attn_rows(acc, l_i, m_i, q, k_ptrs, v_ptrs, row + offs_n, start_m, offs_m, offs_n,
                                       first, last + 1, causal_off, stride_ks, stride_vs, qk_scale,
                                       IS_CAUSAL, False, BLOCK_M, BLOCK_N)
        elif count > 0:  # holes: the key mask read with every key block
            acc, l_i, m_i = _attn_rows(acc, l_i, m_i, q, k_ptrs, v_ptrs, row + offs_n, start_m, offs_m, offs_n,
                                       0, SK, causal_off, stride_ks, stride_vs, qk_scale,
                                       IS_CAUSAL, True, BLOCK_M, BLOCK_N)
    else:
        acc, l_i, m_i = _attn_rows(acc, l_i, m_i, q, k_ptrs, v_ptrs, SEQ_K, start_m, offs_m, offs_n, 0, k_len,
                                   causal_off, stride_ks, stride_vs, qk_scale, IS_CAUSAL, False, BLOCK_M, BLOCK_N)
    empty = l_i == 0.0
    acc = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    row_ok = offs_m < q_len
    o_ptrs = (O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + q_start.to(tl.int64) * stride_os
              + offs_m[:, None] * stride_os + offs_d[None, :])
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh + q_start + offs_m, lse, mask=row_ok)


@dataclass(frozen=True)
class AttnConfig:
    """Launch meta-parameters of the attention kernel (one TensorRT tactic)."""

    BLOCK_M: int
    BLOCK_N: int
    num_warps: int
    num_stages: int


ATTN_TACTICS: dict[str, AttnConfig] = {
    "d64": AttnConfig(128, 64, 8, 3),  # 64-key blocks: 388-398 TFLOP/s against 343-374 for 128 (H100, session 8)
    "d128": AttnConfig(128, 64, 8, 3),
    "d256": AttnConfig(64, 32, 4, 2),
}


# The CUDA C++ wgmma kernel (flash_attention_wgmma.py) by head dim, where it can run and measured faster than the
# Triton kernel (d128: 3 of 4 points at s 2048/8192; at d64 Triton's 128x64 tiles won all four; gpu_notes session 8).
WGMMA_TACTIC_BY_HEAD_DIM = {128: "wgmma_d128"}


def pick_attn_config(head_dim: int, seq_q: int) -> AttnConfig:
    if head_dim <= 64:
        return ATTN_TACTICS["d64"]
    if head_dim <= 128:
        return ATTN_TACTICS["d128"]
    return ATTN_TACTICS["d256"]


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                    scale: float | None = None, seqlens_k: torch.Tensor | None = None,
                    key_mask: torch.Tensor | None = None, cu_seqlens_q: torch.Tensor | None = None, cu_seqlens_k: torch.Tensor | None = None,
                    max_seqlen_q: int | None = None, config: AttnConfig | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention forward; returns (O like q, LSE float32).

    Args:
        q, k, v: dense/padded [B, H, S, D], or packed varlen [T, H, D] with cu_seqlens_q/k.
        causal: bottom-right aligned causal mask.
        scale: softmax scale, default 1/sqrt(D).
        seqlens_k: int32 [B], valid keys per batch (padded mode).
        key_mask: int32 [B, Sk], contiguous; 0 masks key j of batch b (key-masked mode).
        cu_seqlens_q, cu_seqlens_k: int32 [B+1] prefix sums (varlen mode).
        max_seqlen_q: longest query sequence in varlen mode (grid size); computed when None.
        config: launch tactic: an AttnConfig of the Triton kernel, an AttnWgmmaConfig of the CUDA C++ kernel
            (dense/padded contiguous tensors on sm_90a; launched from its plugin PTX) or an AttnDecodeConfig of the
            decode kernel (flash_decode.py; the same, up to 16 query rows per CTA). When None: the wgmma
            kernel where it can run and measured faster (WGMMA_TACTIC_BY_HEAD_DIM: head dim 128; contiguous
            dense/padded tensors, Hopper with NVRTC and CuPy, a positive scale), else the Triton tactic.

    Returns:
        O with q's shape and dtype; LSE float32 [B, Hq, Sq] (dense/padded) or [Hq, Tq] (varlen).
    """
    varlen = cu_seqlens_q is not None or cu_seqlens_k is not None
    if q.dtype not in (torch.float16, torch.bfloat16) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"FlashAttention: q/k/v must share float16/bfloat16, got {q.dtype}, {k.dtype}, {v.dtype}")
    if any(t.stride(-1) != 1 for t in (q, k, v)):
        raise ValueError("FlashAttention: q/k/v need a contiguous last (head) dimension")
    D = q.shape[-1]
    if k.shape[-1] != D or v.shape[-1] != D or D not in (16, 32, 64, 128, 256):
        raise ValueError(f"FlashAttention: head dim must match and be a power of two in 16..256, got {D}")
    if varlen:
        if cu_seqlens_q is None or cu_seqlens_k is None or seqlens_k is not None or key_mask is not None:
            raise ValueError("FlashAttention: varlen needs both cu_seqlens_q and cu_seqlens_k (and no seqlens_k "
                             "or key_mask)")
        if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape:
            raise ValueError("FlashAttention: varlen q/k/v must be [T, H, D]")
        B = cu_seqlens_q.numel() - 1
        if cu_seqlens_k.numel() != B + 1 or cu_seqlens_q.dtype != torch.int32 or cu_seqlens_k.dtype != torch.int32:
            raise ValueError("FlashAttention: cu_seqlens_q/k must be int32 [B+1]")
        Tq, HQ, _ = q.shape
        HKV = k.shape[1]
        if max_seqlen_q is None:
            max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max().item()) if B > 0 else 0
        SQ, SK = max_seqlen_q, k.shape[0]
        mode = MODE_VARLEN
        qs = (0, q.stride(1), q.stride(0))
        ks = (0, k.stride(1), k.stride(0))
        vs = (0, v.stride(1), v.stride(0))
        o = torch.empty_like(q)
        os_ = (0, o.stride(1), o.stride(0))
        lse = torch.empty((HQ, Tq), dtype=torch.float32, device=q.device)
        ls = (0, lse.stride(0))
    else:
        if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape or k.shape[0] != q.shape[0]:
            raise ValueError(f"FlashAttention: q/k/v must be [B, H, S, D], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
        B, HQ, SQ, _ = q.shape
        HKV, SK = k.shape[1], k.shape[2]
        mode = MODE_DENSE
        if seqlens_k is not None:
            if seqlens_k.shape != (B,) or seqlens_k.dtype != torch.int32:
                raise ValueError(f"FlashAttention: seqlens_k must be int32 [{B}]")
            mode = MODE_PADDED
        if key_mask is not None:
            if seqlens_k is not None:
                raise ValueError("FlashAttention: give seqlens_k or key_mask, not both")
            if key_mask.shape != (B, SK) or key_mask.dtype != torch.int32 or not key_mask.is_contiguous():
                raise ValueError(f"FlashAttention: key_mask must be contiguous int32 [{B}, {SK}], got "
                                 f"{key_mask.dtype} {tuple(key_mask.shape)}")
            mode = MODE_KEY_MASK
        qs = (q.stride(0), q.stride(1), q.stride(2))
        ks = (k.stride(0), k.stride(1), k.stride(2))
        vs = (v.stride(0), v.stride(1), v.stride(2))
        o = torch.empty_like(q)
        os_ = (o.stride(0), o.stride(1), o.stride(2))
        lse = torch.empty((B, HQ, SQ), dtype=torch.float32, device=q.device)
        ls = (lse.stride(0), lse.stride(1))
    if HQ % HKV != 0:
        raise ValueError(f"FlashAttention: query heads {HQ} must be a multiple of kv heads {HKV}")
    if B == 0 or SQ == 0:
        return o, lse
    dense_contiguous = mode != MODE_VARLEN and all(t.is_contiguous() for t in (q, k, v))
    if config is None and dense_contiguous and (scale is None or scale > 0) and D in WGMMA_TACTIC_BY_HEAD_DIM \
            and q.is_cuda and sm90a_kernels_available(q.device.index if q.device.index is not None else 0):
        config = ATTN_WGMMA_TACTICS[WGMMA_TACTIC_BY_HEAD_DIM[D]]
    if isinstance(config, (AttnWgmmaConfig, AttnDecodeConfig)):
        fits = not isinstance(config, AttnDecodeConfig) or supports_decode(config, D, float(scale or 0.0), HQ // HKV)
        if not dense_contiguous or config.D != D or (scale is not None and scale <= 0) or not fits:
            raise ValueError(f"FlashAttention: tactic {config.describe()} needs contiguous dense/padded q/k/v with head "
                             f"dim {config.D} and a positive scale" + ("" if fits else ", and at most 16 query rows per CTA"))
        kernel = _cuda_kernel(str(q.dtype).removeprefix("torch."), HQ, HKV, bool(causal), float(scale or 0.0),
                              mode == MODE_PADDED, mode == MODE_KEY_MASK, config)
        launch(kernel, {"Q": q, "K": k, "V": v, "seqlens_k": seqlens_k, "key_mask": key_mask, "O": o, "LSE": lse},
               {"B": B, "SQ": SQ, "SK": SK})
        return o, lse
    cfg = config or pick_attn_config(D, SQ)
    sm_scale = float(scale) if scale is not None else 1.0 / math.sqrt(D)
    grid = (triton.cdiv(SQ, cfg.BLOCK_M), B * HQ)
    _flash_attn_fwd_kernel[grid](
        q, k, v, cu_seqlens_q if mode == MODE_VARLEN else None,
        {MODE_VARLEN: cu_seqlens_k, MODE_PADDED: seqlens_k, MODE_KEY_MASK: key_mask}.get(mode),
        SQ, SK, HQ, *qs, *ks, *vs, *os_, *ls, o, lse,
        SM_SCALE=sm_scale, HEAD_DIM=D, GQA_GROUP=HQ // HKV, IS_CAUSAL=bool(causal), MODE=mode,
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return o, lse


@lru_cache(maxsize=64)
def _cuda_kernel(dtype: str, num_heads: int, kv_num_heads: int, causal: bool, scale: float, padded: bool,
                 key_masked: bool, cfg: AttnWgmmaConfig | AttnDecodeConfig):
    from .aot import FlashAttentionPlugin, build_attn_cuda

    return build_attn_cuda(FlashAttentionPlugin(dtype, num_heads, kv_num_heads, cfg.D, causal, scale, padded,
                                                has_key_mask=key_masked), cfg)


def flash_attention_reference(q, k, v, *, causal=False, scale=None, seqlens_k=None, key_mask=None,
                              dtype: torch.dtype = torch.float32):
    """Plain torch (dense/padded/key-masked layout) in ``dtype``; returns (O, LSE) in ``dtype``."""
    B, HQ, SQ, D = q.shape
    HKV, SK = k.shape[1], k.shape[2]
    scale = scale if scale is not None else 1.0 / math.sqrt(D)
    qf, kf, vf = q.to(dtype), k.to(dtype), v.to(dtype)
    if HKV != HQ:
        kf = kf.repeat_interleave(HQ // HKV, dim=1)
        vf = vf.repeat_interleave(HQ // HKV, dim=1)
    s = (qf @ kf.transpose(-1, -2)) * scale
    j = torch.arange(SK, device=q.device)
    keep = torch.ones((B, 1, SQ, SK), dtype=torch.bool, device=q.device)
    lens = seqlens_k.long() if seqlens_k is not None else torch.full((B,), SK, device=q.device)
    keep = keep & (j[None, None, None, :] < lens[:, None, None, None])
    if key_mask is not None:
        keep = keep & (key_mask != 0)[:, None, None, :]
    if causal:
        i = torch.arange(SQ, device=q.device)
        off = lens - SQ
        keep = keep & (j[None, None, None, :] <= (i[None, None, :, None] + off[:, None, None, None]))
    s = s.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)[..., None])
    o = p @ vf
    return o, lse
