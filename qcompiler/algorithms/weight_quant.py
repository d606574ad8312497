"""Group-wise integer weight quantization: the grid that RTN and GPTQ share.

A linear layer's weight W ∈ R^{K×N} (K input channels, N output channels; ONNX MatMul's [K, N]
layout) is cut along K into groups of ``group_size`` consecutive rows (the last one may be shorter);
every (group g, output channel n) pair has one scale s_gn and, when asymmetric, one zero point z_gn.
``group_size=None`` means one group spanning all of K (per output channel).

Symmetric, b bits (zero point 0, signed codes c ∈ [-2^(b-1), 2^(b-1) - 1]):

    s = 2 · max|w| / (2^b - 1),   c = clamp(round(w / s), -2^(b-1), 2^(b-1) - 1),   ŵ = s · c

  The grid uses all 2^b codes (for 4 bits: -8..7 with s = max|w| / 7.5, as GPTQ does), so the largest
  |w| is off by at most s/2 — the same bound rounding already has — while the step is 7/7.5 of the
  ``max|w| / 7`` grid's.

Asymmetric, b bits (unsigned codes q ∈ [0, 2^b - 1], zero point z in the same range):

    lo = min(w, 0),  hi = max(w, 0),  s = (hi - lo) / (2^b - 1),  z = clamp(round(-lo / s), 0, 2^b - 1)
    q = clamp(round(w / s) + z, 0, 2^b - 1),   ŵ = s · (q - z)

The range always contains 0 so that 0 is exactly representable. All-zero groups get s = 1 (their
codes are the zero point and dequantize to exact zeros). Scales are rounded to the weight's float
dtype *before* codes are computed, so ``dequantize`` reproduces what a runtime computes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

__all__ = [
    "SUPPORTED_BITS", "QuantizedWeight", "code_range", "num_groups", "group_index", "expand_groups",
    "compute_qparams", "quantize", "dequantize", "quantize_rtn",
]

logger = logging.getLogger(__name__)

SUPPORTED_BITS = (2, 3, 4, 8)


def code_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """(q_min, q_max) of the integer codes: signed for symmetric, unsigned for asymmetric."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    if symmetric:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def num_groups(k: int, group_size: int | None) -> int:
    """ceil(K / group_size); 1 for per-channel (group_size None)."""
    return 1 if group_size is None else -(-k // group_size)


def group_index(k: int, group_size: int | None) -> np.ndarray:
    """g(k) for every input channel: the group whose scale row k uses (contiguous groups)."""
    return np.zeros(k, np.int64) if group_size is None else np.arange(k, dtype=np.int64) // group_size


def expand_groups(per_group: np.ndarray, k: int, group_size: int | None) -> np.ndarray:
    """[G, N] -> [K, N]: repeat each group's row for the input channels it covers."""
    return per_group[group_index(k, group_size)]


def _group_reduce(w: np.ndarray, group_size: int | None, ufunc: np.ufunc) -> np.ndarray:
    """[K, N] -> [G, N], reducing each group of rows with ``ufunc`` (np.maximum / np.minimum)."""
    if group_size is None:
        return ufunc.reduce(w, axis=0, keepdims=True)
    return ufunc.reduceat(w, np.arange(0, w.shape[0], group_size), axis=0)


def compute_qparams(w: np.ndarray, bits: int, group_size: int | None, symmetric: bool,
                    scale_dtype: np.dtype | type | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Min/max scales (and zero points) per (group, output channel), as in the module docstring.

    Args:
        w: weight [K, N].
        bits: 2, 3, 4 or 8.
        group_size: rows of K per group, or None for per output channel.
        symmetric: zero point 0 and signed codes, or an unsigned zero point per group.
        scale_dtype: float dtype the scales are stored in (default: w's dtype if floating, else float32).

    Returns:
        scales [G, N] in ``scale_dtype``; zero points [G, N] uint8 (None when symmetric).
    """
    if w.ndim != 2:
        raise ValueError(f"weight must be 2-D [K, N], got shape {w.shape}")
    if scale_dtype is None:
        scale_dtype = w.dtype if np.issubdtype(w.dtype, np.floating) else np.float32
    levels = (1 << bits) - 1
    w64 = w.astype(np.float64)
    hi = np.maximum(_group_reduce(w64, group_size, np.maximum), 0.0)
    lo = np.minimum(_group_reduce(w64, group_size, np.minimum), 0.0)
    if symmetric:
        scale = 2.0 * np.maximum(hi, -lo) / levels
    else:
        scale = (hi - lo) / levels
    scale = np.where(scale > 0, scale, 1.0).astype(scale_dtype)
    if symmetric:
        return scale, None
    zero = np.clip(np.rint(-lo / scale.astype(np.float64)), 0, levels).astype(np.uint8)
    return scale, zero


def quantize(w: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, bits: int,
             group_size: int | None) -> np.ndarray:
    """Integer codes of ``w`` [K, N] on a given grid: int8 signed (symmetric) or uint8 unsigned.

    c = clamp(round(w / s), q_min, q_max) (symmetric) or q = clamp(round(w / s) + z, 0, 2^b - 1).
    """
    k = w.shape[0]
    symmetric = zero_points is None
    qmin, qmax = code_range(bits, symmetric)
    s = expand_groups(scales, k, group_size).astype(np.float64)
    q = np.rint(w.astype(np.float64) / s)
    if not symmetric:
        q += expand_groups(zero_points, k, group_size)
    return np.clip(q, qmin, qmax).astype(np.int8 if symmetric else np.uint8)


def dequantize(codes: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None,
               group_size: int | None, dtype: np.dtype | type | None = None) -> np.ndarray:
    """ŵ = s · (q - z) for codes [K, N]; computed as a runtime does, in the scales' dtype."""
    k = codes.shape[0]
    dtype = dtype or scales.dtype
    q = codes.astype(np.float32)
    if zero_points is not None:
        q = q - expand_groups(zero_points, k, group_size).astype(np.float32)
    return (q * expand_groups(scales, k, group_size).astype(np.float32)).astype(dtype)


@dataclass(frozen=True)
class QuantizedWeight:
    """A weight [K, N] on a b-bit grouped grid, ready to be packed by a lowering.

    Attributes:
        codes: [K, N]; int8 signed codes (symmetric) or uint8 unsigned codes (asymmetric).
        scales: [G, N] float (the weight's dtype), G = ceil(K / group_size) (1 for per channel).
        zero_points: [G, N] uint8, or None for symmetric.
        bits: 2, 3, 4 or 8.
        group_size: rows of K per group, or None for per output channel.
    """

    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    bits: int
    group_size: int | None

    def __post_init__(self):
        k, n = self.codes.shape
        g = num_groups(k, self.group_size)
        if self.scales.shape != (g, n):
            raise ValueError(f"scales must be [{g}, {n}] for codes {self.codes.shape}, got {self.scales.shape}")
        if self.zero_points is not None and self.zero_points.shape != (g, n):
            raise ValueError(f"zero points must be [{g}, {n}], got {self.zero_points.shape}")
        qmin, qmax = code_range(self.bits, self.symmetric)
        if self.codes.size and (int(self.codes.min()) < qmin or int(self.codes.max()) > qmax):
            raise ValueError(f"codes outside [{qmin}, {qmax}] for {self.bits}-bit "
                             f"{'symmetric' if self.symmetric else 'asymmetric'} quantization")

    @property
    def symmetric(self) -> bool:
        return self.zero_points is None

    @property
    def k(self) -> int:
        return self.codes.shape[0]

    @property
    def n(self) -> int:
        return self.codes.shape[1]

    def dequantize(self) -> np.ndarray:
        """ŵ [K, N] in the scales' dtype."""
        return dequantize(self.codes, self.scales, self.zero_points, self.group_size)

    def unsigned_codes(self, offset_bits: int | None = None) -> np.ndarray:
        """Codes as unsigned integers for formats with an implicit zero point of 2^(B-1).

        Symmetric codes c become c + 2^(B-1) with B = ``offset_bits`` (default ``bits``); storing 3-bit
        codes in a 4-bit format uses B = 4, which is exact. Asymmetric codes are returned as they are.
        """
        if not self.symmetric:
            return self.codes.astype(np.uint8)
        width = offset_bits or self.bits
        if width < self.bits:
            raise ValueError(f"cannot store {self.bits}-bit codes in {width} bits")
        return (self.codes.astype(np.int16) + (1 << (width - 1))).astype(np.uint8)


def quantize_rtn(w: np.ndarray, bits: int, group_size: int | None, symmetric: bool) -> QuantizedWeight:
    """Round-to-nearest: min/max grid per group, then ``quantize``. The baseline GPTQ must beat.

    Args:
        w: weight [K, N] (MatMul layout), float.
        bits, group_size, symmetric: the format (see the module docstring).
    """
    scales, zeros = compute_qparams(w, bits, group_size, symmetric)
    return QuantizedWeight(quantize(w, scales, zeros, bits, group_size), scales, zeros, bits, group_size)
