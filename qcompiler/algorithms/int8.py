"""Symmetric int8 quantization, the W8A8 primitives.

    scale = max|x| / 127,   q = clip(round(x / scale), -127, 127),   x_hat = q * scale

127 rather than 128 keeps the grid symmetric so -x quantizes to -q (what TensorRT and SmoothQuant use).
"""

from __future__ import annotations

import numpy as np

__all__ = ["INT8_MAX", "symmetric_scale", "quantize_int8", "fake_quant_int8", "quantize_weight_per_channel",
           "fake_quant_per_token", "sqnr_db"]

INT8_MAX = 127.0


def symmetric_scale(absmax: np.ndarray | float, qmax: float = INT8_MAX) -> np.ndarray:
    """scale = max|x| / qmax, with all-zero ranges mapped to 1 so they quantize to exact zeros."""
    absmax = np.asarray(absmax, dtype=np.float32)
    return np.where(absmax > 0, absmax / qmax, 1.0).astype(np.float32)


def quantize_int8(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x / scale), -INT8_MAX, INT8_MAX).astype(np.int8)


def fake_quant_int8(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return quantize_int8(x, scale).astype(np.float32) * scale


def quantize_weight_per_channel(w_kn: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """W [K, N] -> (int8 [K, N], scale [N]): one scale per output channel (column)."""
    scale = symmetric_scale(np.abs(w_kn).max(axis=0))
    return quantize_int8(w_kn, scale), scale


def fake_quant_per_token(x: np.ndarray) -> np.ndarray:
    """Per-row dynamic int8: each row (token) gets scale max|x_row| / 127."""
    scale = symmetric_scale(np.abs(x).max(axis=-1, keepdims=True))
    return fake_quant_int8(x, scale)


def sqnr_db(reference: np.ndarray, approximation: np.ndarray) -> float:
    """SQNR = 20 log10(||x|| / ||x - y||) in dB (inf when identical)."""
    reference = np.asarray(reference, np.float64)
    noise = np.linalg.norm(reference - np.asarray(approximation, np.float64))
    signal = np.linalg.norm(reference)
    if noise == 0:
        return float("inf")
    return float(20.0 * np.log10(max(signal, 1e-300) / noise))
