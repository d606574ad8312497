"""The op contract between the graph side (passes) and the GPU side (kernels, TensorRT plugins).

Every custom op lives in domain ``qcompiler`` (opset version 1). This module is pure Python/numpy:
passes import it to build nodes, the TensorRT bindings import it for shape rules, and it never imports
torch, Triton or graph code.

Ops
===

``qcompiler::Int4Gemm``: weight-only INT4 GEMM, ``Y = X @ dequant(B)^T (+ bias)``.
    Inputs: ``X`` [..., K] float16/bfloat16 (float32 allowed in the ONNX graph, cast by the backend);
    ``B`` uint8 [N, n_blocks, block_size/2]; ``scales`` [N, n_blocks] (X's dtype in the plugin; the
    ONNX node may hold float32); optional ``zero_points`` uint8 [N, ceil(n_blocks/2)] (an empty name
    skips it); optional ``bias`` [N].
    Attributes: ``K`` (int), ``N`` (int), ``block_size`` (int: 16..256 power of two, or K rounded up
    to a multiple of 16 for per-channel), ``bits`` (int, must be 4).
    Output: ``Y`` [..., N], X's dtype.
    Layout (``INT4_LAYOUT``, identical to com.microsoft.MatMulNBits with bits=4, so lowering is a
    rename): the weight W [N, K] is split along K into ``n_blocks = ceil(K / block_size)`` blocks;
    K is zero-padded to ``n_blocks * block_size``. Element ``W[n, k]`` with ``k = blk * block_size + i``
    is the 4-bit unsigned ``q`` stored in byte ``B[n, blk, i // 2]``: low nibble (bits 0-3) when i is
    even, high nibble (bits 4-7) when i is odd. Its scale is ``scales[n, blk]``; its zero point is
    nibble ``blk % 2`` (low for even blk) of byte ``zero_points[n, blk // 2]``, or 8 when the input is
    absent (symmetric weights stored as ``q_signed + 8``). ``W[n, k] = (q - zp) * scale``.
    Plugin: one kernel launch reading exactly these tensors; no workspace (no split-K), no re-layout.

``qcompiler::W8A8Gemm``: ``Y = (A @ B^T) * a_scale[..., None] * b_scale[None, :] (+ bias)``.
    Inputs: ``A`` int8 [..., K]; ``a_scale`` float32 [...] (one per token, i.e. A's shape without K);
    ``B`` int8 [N, K] (K contiguous); ``b_scale`` float32 [N]; optional ``bias`` [N].
    Attributes: ``out_dtype`` (int, onnx TensorProto FLOAT16=10 or BFLOAT16=16; default 10).
    Output: ``Y`` [..., N] of out_dtype. int32 accumulation, epilogue in float32.

``qcompiler::QuantizePerToken``: per-row symmetric int8, optionally after RMSNorm / LayerNorm.
    Inputs: ``X`` [..., H] float16/bfloat16/float32; optional ``gamma`` [H]; optional ``beta`` [H].
    Attributes: ``norm`` (string: "none", "rms", "layer"; default "none"), ``epsilon`` (float,
    default 1e-6).
    Outputs: ``Q`` int8 [..., H]; ``scale`` float32 [...]. ``scale = max|y| / 127`` (floored at
    1e-8/127), ``Q = clamp(round_half_even(y / scale), -127, 127)`` with y the normalized row.

``qcompiler::FlashAttention``: ``O = softmax(scale * Q K^T + mask) V`` and its log-sum-exp.
    Inputs: ``Q`` [B, Hq, Sq, D]; ``K``, ``V`` [B, Hkv, Sk, D] (Hq a multiple of Hkv: GQA/MQA; query
    head h uses kv head h // (Hq/Hkv)); optional ``seqlens_k`` int32 [B] (keys j >= seqlens_k[b] are
    masked: a right-padded key padding mask, as a KV-cache decode step has it); optional ``key_mask``
    int32 [B, Sk] (key j of batch b is masked where key_mask[b, j] == 0: any padding, left or right, as
    an attention_mask input holds it; K/V at masked keys are read and must be finite, as computed
    tensors are). At most one of the two. Q/K/V share float16/bfloat16 (float32
    allowed in the graph for ONNX Runtime checks). D in {16, 32, 64, 128, 256}.
    Attributes: ``causal`` (int 0/1, default 0; bottom-right aligned: query i sees key j iff
    j <= i + Sk_b - Sq, with Sk_b = seqlens_k[b] if given, else Sk), ``scale`` (float, default 0
    meaning 1/sqrt(D)).
    TensorRT: a plugin's input list is fixed, so a node with ``seqlens_k`` or ``key_mask`` is registered as
    ``qcompiler::FlashAttentionSeqLens(Q, K, V, seqlens_k)`` or ``qcompiler::FlashAttentionKeyMask(Q, K, V,
    key_mask)`` (:data:`MASKED_ATTENTION_PLUGINS`; the backend renames the node before parsing).
    Outputs: ``O`` like Q; optional ``LSE`` float32 [B, Hq, Sq] (natural log; -inf for a row that sees
    no key, whose O is 0).
    The kernel also takes packed variable-length batches (cu_seqlens); that form is a kernel-level API
    (``flash_attention(..., cu_seqlens_q=, cu_seqlens_k=)``), not an ONNX input form.

Shape rules are written once (:func:`infer_output_shapes`) over opaque dimension objects, so the same
code serves ONNX shape inference (ints / symbolic strings) and TensorRT's shape descriptors (dimension
expressions): outputs only copy or rearrange input dimensions and take N from the weight.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "DOMAIN", "DOMAIN_VERSION", "INT4_GEMM", "W8A8_GEMM", "QUANTIZE_PER_TOKEN", "FLASH_ATTENTION",
    "OpSpec", "OP_SPECS", "INT4_LAYOUT", "infer_output_shapes", "validate_attributes",
    "pack_int4_matmulnbits", "unpack_int4_matmulnbits", "NORMS", "MASKED_ATTENTION_PLUGINS",
]

logger = logging.getLogger(__name__)

DOMAIN = "qcompiler"
DOMAIN_VERSION = 1
INT4_GEMM = "Int4Gemm"
W8A8_GEMM = "W8A8Gemm"
QUANTIZE_PER_TOKEN = "QuantizePerToken"
FLASH_ATTENTION = "FlashAttention"
NORMS = ("none", "rms", "layer")
# FlashAttention's optional mask input (its index) -> the TensorRT plugin that takes Q, K, V and that input.
MASKED_ATTENTION_PLUGINS = {3: "FlashAttentionSeqLens", 4: "FlashAttentionKeyMask"}

INT4_LAYOUT = (
    "MatMulNBits bits=4: B uint8 [N, n_blocks, block_size/2]; k = blk*block_size + i -> byte i//2 of "
    "B[n, blk], low nibble for even i; scales [N, n_blocks]; zero_points uint8 [N, ceil(n_blocks/2)] "
    "(nibble blk%2 of byte blk//2), default 8; w = (q - zp) * scale"
)


@dataclass(frozen=True)
class OpSpec:
    """One op of the contract: names of inputs/outputs (optional ones marked) and attribute defaults."""

    op_type: str
    inputs: tuple[str, ...]
    optional_inputs: frozenset[str]
    outputs: tuple[str, ...]
    optional_outputs: frozenset[str]
    attributes: dict[str, Any] = field(default_factory=dict)  # name -> default (None: required)


OP_SPECS: dict[str, OpSpec] = {
    INT4_GEMM: OpSpec(INT4_GEMM, ("X", "B", "scales", "zero_points", "bias"), frozenset({"zero_points", "bias"}),
                      ("Y",), frozenset(), {"K": None, "N": None, "block_size": None, "bits": 4}),
    W8A8_GEMM: OpSpec(W8A8_GEMM, ("A", "a_scale", "B", "b_scale", "bias"), frozenset({"bias"}),
                      ("Y",), frozenset(), {"out_dtype": 10}),
    QUANTIZE_PER_TOKEN: OpSpec(QUANTIZE_PER_TOKEN, ("X", "gamma", "beta"), frozenset({"gamma", "beta"}),
                               ("Q", "scale"), frozenset(), {"norm": "none", "epsilon": 1e-6}),
    FLASH_ATTENTION: OpSpec(FLASH_ATTENTION, ("Q", "K", "V", "seqlens_k", "key_mask"), frozenset({"seqlens_k", "key_mask"}),
                            ("O", "LSE"), frozenset({"LSE"}), {"causal": 0, "scale": 0.0}),
}


def validate_attributes(op_type: str, attrs: dict[str, Any], node_name: str = "") -> dict[str, Any]:
    """Fills defaults and checks values; returns the full attribute dict.

    Raises:
        ValueError: naming the node, for an unknown op, a missing required or an invalid attribute.
    """
    where = f"{op_type} node {node_name!r}" if node_name else op_type
    if op_type not in OP_SPECS:
        raise ValueError(f"unknown op qcompiler::{op_type}")
    spec = OP_SPECS[op_type]
    out = dict(spec.attributes)
    for key, value in attrs.items():
        if key not in spec.attributes:
            raise ValueError(f"{where}: unknown attribute {key!r} (expected {sorted(spec.attributes)})")
        out[key] = value
    missing = [k for k, v in out.items() if v is None]
    if missing:
        raise ValueError(f"{where}: missing required attribute(s) {missing}")
    if op_type == INT4_GEMM:
        if out["bits"] != 4:
            raise ValueError(f"{where}: bits must be 4, got {out['bits']}")
        K, N, bs = int(out["K"]), int(out["N"]), int(out["block_size"])
        if K <= 0 or N <= 0:
            raise ValueError(f"{where}: K and N must be positive, got K={K}, N={N}")
        per_channel = bs >= K and bs % 16 == 0
        if not (per_channel or (16 <= bs <= 256 and bs & (bs - 1) == 0)):
            raise ValueError(f"{where}: block_size must be a power of two in 16..256 or >= K (per-channel), got {bs}")
    elif op_type == W8A8_GEMM:
        if int(out["out_dtype"]) not in (10, 16):
            raise ValueError(f"{where}: out_dtype must be 10 (float16) or 16 (bfloat16), got {out['out_dtype']}")
    elif op_type == QUANTIZE_PER_TOKEN:
        norm = out["norm"].decode() if isinstance(out["norm"], bytes) else out["norm"]
        if norm not in NORMS:
            raise ValueError(f"{where}: norm must be one of {NORMS}, got {norm!r}")
        out["norm"] = norm
        if not float(out["epsilon"]) > 0:
            raise ValueError(f"{where}: epsilon must be > 0")
    elif op_type == FLASH_ATTENTION:
        if int(out["causal"]) not in (0, 1):
            raise ValueError(f"{where}: causal must be 0 or 1")
        if float(out["scale"]) < 0:
            raise ValueError(f"{where}: scale must be >= 0 (0 means 1/sqrt(head_dim))")
    return out


def infer_output_shapes(op_type: str, input_shapes: Sequence[Sequence[Any] | None],
                        attrs: dict[str, Any] | None = None) -> list[list[Any]]:
    """Output shapes from input shapes; dims are opaque (ints, strings, None or TensorRT dim exprs).

    Args:
        op_type: one of the qcompiler op types.
        input_shapes: one shape per declared input, in order (None for an absent optional input).
        attrs: the node's attributes (Int4Gemm uses N when B's shape is unknown).

    Returns:
        One shape (list of dims) per output, in the declared order.

    Raises:
        ValueError: a rank that the op cannot take.
    """
    attrs = attrs or {}

    def rank(i: int, lo: int, hi: int | None = None) -> Sequence[Any]:
        shape = input_shapes[i]
        name = OP_SPECS[op_type].inputs[i]
        if shape is None:
            raise ValueError(f"{op_type}: input {name} is required")
        if len(shape) < lo or (hi is not None and len(shape) > hi):
            raise ValueError(f"{op_type}: input {name} has rank {len(shape)}, expected {lo}..{hi or 'n'}")
        return shape

    if op_type == INT4_GEMM:
        x = rank(0, 1)
        n = attrs.get("N")
        if n is None:
            n = rank(1, 3, 3)[0]
        return [list(x[:-1]) + [n]]
    if op_type == W8A8_GEMM:
        a = rank(0, 1)
        return [list(a[:-1]) + [rank(2, 2, 2)[0]]]
    if op_type == QUANTIZE_PER_TOKEN:
        x = rank(0, 1)
        return [list(x), list(x[:-1])]
    if op_type == FLASH_ATTENTION:
        q = rank(0, 4, 4)
        rank(1, 4, 4)
        return [list(q), list(q[:3])]
    raise ValueError(f"unknown op qcompiler::{op_type}")


def pack_int4_matmulnbits(w, block_size: int, *, symmetric: bool = True, scale_dtype=None):
    """Round-to-nearest INT4 quantization of ``w [N, K]`` into the MatMulNBits layout.

    Symmetric: ``scale = max|w| / 7`` per block, ``q = clamp(round(w / scale), -8, 7) + 8`` (no zero
    points returned). Asymmetric: ``scale = (max - min) / 15``, ``zp = clamp(round(-min / scale), 0, 15)``,
    ``q = clamp(round(w / scale) + zp, 0, 15)``. Accepts numpy or torch (any device; returns the same
    kind, on the same device; scales in ``scale_dtype`` or w's dtype).

    Returns:
        (B uint8 [N, n_blocks, block_size/2], scales [N, n_blocks], zero_points uint8 [N, ceil(n_blocks/2)] or None)
    """
    is_torch = type(w).__module__.startswith("torch")
    if is_torch:
        import torch

        device, wdtype = w.device, w.dtype
        wn = w.detach().float().cpu().numpy()
    else:
        wn = np.asarray(w, dtype=np.float32)
    N, K = wn.shape
    n_blocks = -(-K // block_size)
    wp = np.zeros((N, n_blocks * block_size), np.float32)
    wp[:, :K] = wn
    wb = wp.reshape(N, n_blocks, block_size)
    if symmetric:
        scale = np.abs(wb).max(-1) / 7.0
        scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
        q = np.clip(np.rint(wb / scale[..., None]), -8, 7) + 8
        zp = None
    else:
        lo, hi = np.minimum(wb.min(-1), 0), np.maximum(wb.max(-1), 0)
        scale = (hi - lo) / 15.0
        scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
        zpv = np.clip(np.rint(-lo / scale), 0, 15)
        q = np.clip(np.rint(wb / scale[..., None]) + zpv[..., None], 0, 15)
        zpad = np.zeros((N, 2 * (-(-n_blocks // 2))), np.uint8)
        zpad[:, :n_blocks] = zpv.astype(np.uint8)
        zp = (zpad[:, 0::2] | (zpad[:, 1::2] << 4)).astype(np.uint8)
    q = q.astype(np.uint8)
    # Padded K positions must hold the value whose dequant is 0 only if x were non-zero there; x is
    # zero-padded by definition, so any code works. Keep zp (8 for symmetric) for clean dequant.
    b = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    if is_torch:
        sd = scale_dtype or (wdtype if wdtype.is_floating_point else torch.float32)
        return (torch.from_numpy(b).to(device), torch.from_numpy(scale).to(device=device, dtype=sd),
                None if zp is None else torch.from_numpy(zp).to(device))
    scale = scale.astype(scale_dtype or np.float32)
    return b, scale, zp


def unpack_int4_matmulnbits(b: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, K: int) -> np.ndarray:
    """Inverse of the layout: dense float32 W [N, K] (``(q - zp) * scale``)."""
    N, n_blocks, half = b.shape
    q = np.stack([b & 0xF, b >> 4], axis=-1).reshape(N, n_blocks, 2 * half).astype(np.float32)
    if zero_points is None:
        zp = np.full((N, n_blocks), 8.0, np.float32)
    else:
        zp = np.stack([zero_points & 0xF, zero_points >> 4], axis=-1).reshape(N, -1)[:, :n_blocks].astype(np.float32)
    w = (q - zp[..., None]) * scales.astype(np.float32)[..., None]
    return w.reshape(N, -1)[:, :K]


def default_scale(head_dim: int, scale: float) -> float:
    """FlashAttention's ``scale`` attribute: 0 means 1/sqrt(head_dim)."""
    return float(scale) if scale else 1.0 / math.sqrt(head_dim)
