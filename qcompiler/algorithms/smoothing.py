"""SmoothQuant's per-channel migration factors (Xiao et al. 2022).

For Y = X W with X [T, K], W [K, N], any positive s in R^K gives

    Y = (X diag(s)^-1) (diag(s) W),

so activation outliers in channel j can be divided by s_j and the weight row j multiplied by it. With

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

both sides end with per-channel ranges max|X_j|^(1-alpha) max|W_j|^alpha: alpha = 0 leaves X alone,
alpha = 1 moves all of X's range into W. Consumers of one activation share s, so max|W_j| is taken
over the row j of all of their weights.
"""

from __future__ import annotations

import numpy as np

from qcompiler.algorithms.int8 import (
    fake_quant_int8,
    fake_quant_per_token,
    quantize_weight_per_channel,
    symmetric_scale,
)

__all__ = ["smoothing_factors", "smoothed_gemm_error"]

_MIN_FACTOR = 1e-5


def smoothing_factors(act_absmax: np.ndarray, weight_absmax: np.ndarray, alpha: float) -> np.ndarray:
    """s_j = max|X_j|^alpha / max|W_j|^(1-alpha), 1 where a channel is dead on either side.

    Args:
        act_absmax: [K] max|X_j| over calibration tokens.
        weight_absmax: [K] max over output channels (of every consumer) of |W_jn|.
        alpha: migration strength in [0, 1].
    """
    act_absmax = np.asarray(act_absmax, np.float64)
    weight_absmax = np.asarray(weight_absmax, np.float64)
    live = (act_absmax > 0) & (weight_absmax > 0)
    s = np.ones_like(act_absmax)
    s[live] = act_absmax[live] ** alpha / weight_absmax[live] ** (1.0 - alpha)
    return np.clip(s, _MIN_FACTOR, None).astype(np.float32)


def smoothed_gemm_error(x: np.ndarray, weights_kn: list[np.ndarray], s: np.ndarray, per_token: bool,
                        act_absmax: np.ndarray | None = None) -> float:
    """Sum over GEMMs of ||X W - Q(X/s) Q(sW)||^2 / ||X W||^2 under W8A8 fake quantization.

    Args:
        x: [T, K] sample activations.
        weights_kn: the [K, N] weights sharing x.
        s: [K] smoothing factors.
        per_token: dynamic per-row activation scales; else one static scale from ``act_absmax / s``.
        act_absmax: [K] calibration max|X_j| (for the static case).
    """
    xs = x / s
    if per_token:
        xq = fake_quant_per_token(xs)
    else:
        absmax = float((act_absmax / s).max()) if act_absmax is not None else float(np.abs(xs).max())
        xq = fake_quant_int8(xs, symmetric_scale(absmax))
    total = 0.0
    for w in weights_kn:
        reference = x @ w
        q, scale = quantize_weight_per_channel(w * s[:, None])
        approx = xq @ (q.astype(np.float32) * scale)
        total += float(np.sum((reference - approx) ** 2) / max(np.sum(reference ** 2), 1e-30))
    return total
