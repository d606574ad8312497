"""Group-wise weight quantization grid: ranges, error bounds, exact representability, dtypes."""

import numpy as np
import pytest

from qcompiler.algorithms.weight_quant import (
    QuantizedWeight,
    code_range,
    compute_qparams,
    dequantize,
    expand_groups,
    num_groups,
    quantize,
    quantize_rtn,
)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [None, 16, 32])
def test_rtn_error_within_half_step_and_codes_in_range(bits, symmetric, group_size):
    rng = np.random.default_rng(bits)
    w = rng.normal(size=(72, 9)).astype(np.float32)  # K=72: the last group of 16/32 is partial
    q = quantize_rtn(w, bits, group_size, symmetric)
    qmin, qmax = code_range(bits, symmetric)
    assert q.codes.dtype == (np.int8 if symmetric else np.uint8)
    assert q.codes.min() >= qmin and q.codes.max() <= qmax
    assert q.scales.shape == (num_groups(72, group_size), 9) and q.scales.dtype == np.float32
    step = expand_groups(q.scales, 72, group_size)
    err = np.abs(q.dequantize() - w)
    # Symmetric: every weight (the extreme ones too) is within half a step. Asymmetric: rounding the
    # zero point may push the far end up to one step.
    assert np.all(err <= step * (0.5 if symmetric else 1.0) + 1e-6)
    assert np.mean(err <= step * 0.5 + 1e-6) > 0.99


def test_symmetric_grid_uses_all_codes_and_keeps_zero_exact():
    w = np.array([[-1.0], [1.0], [0.0], [0.5], [-0.95]], np.float32)
    q = quantize_rtn(w, 4, None, True)
    np.testing.assert_allclose(q.scales, [[2.0 / 15.0]], rtol=1e-6)
    # max|w| sits at ±7.5 steps: +7.5 clips to 7, -7.5 rounds to -8 or -7 (both half a step off).
    assert q.codes[0, 0] in (-8, -7) and q.codes[1, 0] == 7 and q.codes[2, 0] == 0
    assert q.codes[4, 0] == -7  # -0.95 / (2/15) = -7.125
    assert q.dequantize()[2, 0] == 0.0
    # The finer grid (step 2a/15 instead of a/7) lowers the mean error against the a/7 grid.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(128, 64)).astype(np.float32)
    err_ours = np.abs(quantize_rtn(x, 4, None, True).dequantize() - x).mean()
    s7 = np.abs(x).max(axis=0) / 7
    err_7 = np.abs(np.clip(np.rint(x / s7), -7, 7) * s7 - x).mean()
    assert err_ours < err_7


def test_asymmetric_zero_point_represents_zero_and_one_sided_groups():
    w = np.linspace(0.1, 2.0, 32, dtype=np.float32).reshape(32, 1)  # all positive: lo clamps to 0
    scales, zeros = compute_qparams(w, 4, 16, symmetric=False)
    assert np.all(zeros == 0)
    codes = quantize(w, scales, zeros, 4, 16)
    assert codes.max() == 15
    w_neg = -w
    _, zeros_neg = compute_qparams(w_neg, 4, 16, symmetric=False)
    assert np.all(zeros_neg == 15)
    # 0 is always a grid point: a group with 0 in it dequantizes it exactly.
    mixed = np.concatenate([w_neg[:8], np.zeros((1, 1), np.float32), w[:7]])
    q = quantize_rtn(mixed, 4, 16, False)
    assert q.dequantize()[8, 0] == 0.0


def test_all_zero_group_quantizes_to_zeros():
    w = np.zeros((32, 3), np.float32)
    w[16:, 1] = 1.0
    for symmetric in (True, False):
        q = quantize_rtn(w, 4, 16, symmetric)
        assert np.isfinite(q.scales).all() and (q.scales > 0).all()
        np.testing.assert_array_equal(q.dequantize()[:16], 0.0)


def test_fp16_scales_are_rounded_before_coding():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(64, 8)).astype(np.float16)
    q = quantize_rtn(w, 4, 32, True)
    assert q.scales.dtype == np.float16
    # Dequantizing with the stored (rounded) scales keeps the half-step bound.
    err = np.abs(q.dequantize().astype(np.float32) - w.astype(np.float32))
    assert np.all(err <= expand_groups(q.scales.astype(np.float32), 64, 32) * 0.5 + 1e-3)


def test_grid_values_round_trip_exactly():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(48, 5)).astype(np.float32)
    q = quantize_rtn(w, 3, 16, False)
    again = quantize(q.dequantize(), q.scales, q.zero_points, 3, 16)
    np.testing.assert_array_equal(again, q.codes)
    np.testing.assert_array_equal(dequantize(again, q.scales, q.zero_points, 16), q.dequantize())


def test_unsigned_codes_offset_for_wider_storage():
    w = np.array([[-0.9], [1.0], [0.0]], np.float32)  # s = 2/7: codes -3, 3, 0
    q = quantize_rtn(w, 3, None, True)
    assert q.codes.ravel().tolist() == [-3, 3, 0]
    assert q.unsigned_codes().ravel().tolist() == [1, 7, 4]
    assert q.unsigned_codes(offset_bits=4).ravel().tolist() == [5, 11, 8]
    with pytest.raises(ValueError, match="cannot store"):
        quantize_rtn(w, 8, None, True).unsigned_codes(offset_bits=4)


def test_invalid_inputs_are_rejected():
    with pytest.raises(ValueError, match="bits"):
        code_range(5, True)
    with pytest.raises(ValueError, match="2-D"):
        compute_qparams(np.zeros(4, np.float32), 4, None, True)
    with pytest.raises(ValueError, match="outside"):
        QuantizedWeight(np.full((16, 1), 9, np.int8), np.ones((1, 1), np.float32), None, 4, None)
    with pytest.raises(ValueError, match="scales must be"):
        QuantizedWeight(np.zeros((32, 2), np.int8), np.ones((1, 2), np.float32), None, 4, 16)
