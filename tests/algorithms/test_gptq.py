"""GPTQ: the blocked Cholesky implementation equals a plain column-by-column OBS reference, beats RTN
on correlated inputs, and handles dead inputs, damping retries and the Hessian stream."""

import logging

import numpy as np
import pytest
import torch

from qcompiler.algorithms.gptq import HessianAccumulator, _upper_cholesky_of_inverse, gptq_quantize
from qcompiler.algorithms.weight_quant import code_range, compute_qparams, group_index, num_groups, quantize_rtn


def reference_gptq(W, H, *, bits, group_size, symmetric, act_order, damp):
    """The paper's algorithm without its tricks: one column at a time, H⁻¹ of the remaining columns
    updated by Gaussian elimination (eq. 3), every remaining column updated right away (float64)."""
    W = W.astype(np.float64).copy()
    H = H.astype(np.float64).copy()
    n, k = W.shape
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    group = group_index(k, group_size)
    static = act_order or group_size is None
    scales = np.zeros((n, num_groups(k, group_size)))
    zeros = None if symmetric else np.zeros_like(scales)
    if static:
        s, z = compute_qparams(W.T, bits, group_size, symmetric, np.float32)
        scales[:] = s.T
        if zeros is not None:
            zeros[:] = z.T
    order = np.argsort(-np.diag(H), kind="stable") if act_order else np.arange(k)
    Hinv = np.linalg.inv(H + damp * np.mean(np.diag(H)) * np.eye(k))
    qmin, qmax = code_range(bits, symmetric)
    Q = np.zeros_like(W)
    codes = np.zeros((n, k), np.int64)
    for t, j in enumerate(order):
        g = group[j]
        if not static and j % group_size == 0:
            s, z = compute_qparams(W[:, j:j + group_size].T, bits, None, symmetric, np.float32)
            scales[:, g] = s[0]
            if zeros is not None:
                zeros[:, g] = z[0]
        w, s = W[:, j], scales[:, g]
        zero = 0.0 if zeros is None else zeros[:, g]
        c = np.clip(np.round(w / s) + zero, qmin, qmax)
        Q[:, j], codes[:, j] = s * (c - zero), c
        rest = order[t + 1:]
        W[:, rest] -= np.outer((w - Q[:, j]) / Hinv[j, j], Hinv[j, rest])
        Hinv = Hinv - np.outer(Hinv[:, j], Hinv[j, :]) / Hinv[j, j]
    return Q, codes


def _source(rng, k, rho=0.6, dead=()):
    """A fixed distribution of inputs [K, tokens] with correlated channels of unequal scale (what
    makes GPTQ's error feedback pay off); calling it draws tokens."""
    mix = np.linalg.cholesky((1 - rho) * np.eye(k) + rho * np.ones((k, k)))
    scale = rng.uniform(0.2, 3.0, size=(k, 1))
    scale[list(dead)] = 0.0

    def draw(tokens):
        return mix @ rng.normal(size=(k, tokens)) * scale

    return draw


def _correlated(rng, k, tokens, dead=()):
    return _source(rng, k, dead=dead)(tokens)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [None, 16, 32])
@pytest.mark.parametrize("block_size", [8, 128])
def test_blocked_gptq_equals_column_by_column_reference(act_order, symmetric, group_size, block_size):
    rng = np.random.default_rng(7)
    k, n = 80, 12  # K not a multiple of 32: the last group is partial
    x = _correlated(rng, k, 300, dead=(5,))
    H = 2 * x @ x.T / x.shape[1]
    W = rng.normal(size=(n, k))
    Q_ref, codes_ref = reference_gptq(W, H, bits=4, group_size=group_size, symmetric=symmetric,
                                      act_order=act_order, damp=0.01)
    # float64 work, float32 scales (as the reference): ties cannot flip on rounding noise.
    got = gptq_quantize(W, H, bits=4, group_size=group_size, symmetric=symmetric, act_order=act_order,
                        damp=0.01, block_size=block_size, dtype=torch.float64, device="cpu")
    np.testing.assert_array_equal(got.codes.numpy(), codes_ref)
    np.testing.assert_allclose(got.Q.numpy(), Q_ref, rtol=1e-6, atol=1e-6)
    assert (got.perm is not None) == act_order


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_float32_gptq_agrees_with_reference(bits):
    rng = np.random.default_rng(bits)
    x = _correlated(rng, 64, 256)
    H = 2 * x @ x.T / x.shape[1]
    W = rng.normal(size=(16, 64))
    Q_ref, codes_ref = reference_gptq(W, H, bits=bits, group_size=32, symmetric=True, act_order=True, damp=0.01)
    got = gptq_quantize(torch.tensor(W, dtype=torch.float32), torch.tensor(H), bits=bits, group_size=32,
                        act_order=True, device="cpu")
    # float32 rounding flips a few near-ties (more of them on the fine 8-bit grid), after which the
    # two runs diverge slightly; the layer outputs must still agree closely.
    assert np.mean(got.codes.numpy() == codes_ref) > 0.95
    rel = np.linalg.norm((got.Q.numpy() - Q_ref) @ x) / np.linalg.norm(W @ x)
    assert rel < 2 ** -bits / 10


def _output_error(W, Q, x):
    return float(np.linalg.norm((W - Q) @ x) ** 2)


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("act_order", [False, True])
def test_layer_output_error_below_rtn_on_correlated_inputs(bits, act_order):
    rng = np.random.default_rng(11)
    k, n = 128, 48
    draw = _source(rng, k)
    x_cal, x_test = draw(1024), draw(512)
    W = rng.normal(size=(n, k)).astype(np.float32)
    H = HessianAccumulator(k, device="cpu")
    H.add_batch(x_cal.T.astype(np.float32))
    got = gptq_quantize(W, H.finalize(), bits=bits, group_size=32, act_order=act_order, device="cpu")
    rtn = quantize_rtn(W.T, bits, 32, True).dequantize().T
    for x in (x_cal, x_test):
        gptq_err, rtn_err = _output_error(W, got.Q.numpy(), x), _output_error(W, rtn, x)
        assert gptq_err < 0.7 * rtn_err, (gptq_err, rtn_err)


def test_dead_inputs_keep_rounded_weights():
    rng = np.random.default_rng(3)
    k = 32
    x = _correlated(rng, k, 200, dead=(0, 9))
    H = 2 * x @ x.T / x.shape[1]
    W = rng.normal(size=(8, k)).astype(np.float32)
    H_before = H.copy()
    got = gptq_quantize(W, H, bits=4, group_size=16, act_order=True, device="cpu", dtype=torch.float64)
    np.testing.assert_array_equal(H, H_before)  # the caller's Hessian is not edited
    rtn = quantize_rtn(W.T, 4, 16, True)
    # A dead column is decoupled: with static groups it is exactly the round-to-nearest value.
    np.testing.assert_allclose(got.Q.numpy()[:, [0, 9]], rtn.dequantize().T[:, [0, 9]], rtol=1e-6)
    assert np.isfinite(got.Q.numpy()).all()


def test_damping_is_raised_when_hessian_is_indefinite(caplog):
    H = torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=torch.float64)  # not a Gram matrix
    with caplog.at_level(logging.WARNING):
        got = gptq_quantize(torch.ones(3, 2), H, bits=4, group_size=None, act_order=False, device="cpu")
    assert got.damp >= 1.0 and "not positive definite" in caplog.text
    assert torch.isfinite(got.Q).all()


def test_upper_factor_of_the_damped_inverse():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(200, 12)) @ rng.normal(size=(12, 12))  # correlated inputs
    H = torch.from_numpy(2.0 * x.T @ x / 200)
    U, used = _upper_cholesky_of_inverse(H, 0.01)
    damped = H + used * H.diagonal().mean() * torch.eye(12, dtype=H.dtype)
    assert used == 0.01
    assert torch.equal(U, torch.triu(U)) and bool((U.diagonal() > 0).all())
    torch.testing.assert_close(U.T @ U, torch.linalg.inv(damped), rtol=1e-9, atol=1e-12)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="must be"):
        gptq_quantize(torch.ones(3, 4), torch.eye(5), device="cpu")
    with pytest.raises(ValueError, match="NaN"):
        gptq_quantize(torch.ones(3, 2), torch.tensor([[float("nan"), 0.0], [0.0, 1.0]]), device="cpu")


def test_hessian_stream_equals_batch_formula():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(3, 7, 24)).astype(np.float32)  # [batch, seq, K]: every row is a token
    full = x.reshape(-1, 24).astype(np.float64)
    expected = 2 * full.T @ full / full.shape[0]
    for dtype in (torch.float64, torch.float32):
        acc = HessianAccumulator(24, dtype=dtype, device="cpu")
        for part in (x[:1], x[1:]):
            acc.add_batch(part)
        assert acc.count == 21
        np.testing.assert_allclose(acc.finalize().double().numpy(), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="channels"):
        acc.add_batch(np.zeros((2, 5), np.float32))
    with pytest.raises(ValueError, match="no activations"):
        HessianAccumulator(4, device="cpu").finalize()


@pytest.mark.gpu
def test_cuda_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    rng = np.random.default_rng(9)
    x = _correlated(rng, 256, 1024)
    acc = HessianAccumulator(256, device="cuda")
    acc.add_batch(torch.tensor(x.T, dtype=torch.float32, device="cuda"))
    H = acc.finalize()
    W = torch.tensor(rng.normal(size=(64, 256)), dtype=torch.float32)
    gpu = gptq_quantize(W, H, bits=4, group_size=64, act_order=True, device="cuda")
    cpu = gptq_quantize(W, H.cpu(), bits=4, group_size=64, act_order=True, device="cpu")
    assert (gpu.codes == cpu.codes).float().mean() > 0.99
    assert _output_error(W.numpy(), gpu.Q.numpy(), x) < 1.01 * _output_error(W.numpy(), cpu.Q.numpy(), x)
