"""INT4 and MatMulNBits packing: round trips, agreement with onnx's own INT4 packing, and ORT's reading."""

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qcompiler.algorithms.packing import (
    int4_tensor_proto,
    matmul_nbits_shapes,
    pack_int4,
    pack_low_first,
    pack_matmul_nbits,
    pack_matmul_nbits_zero_points,
    unpack_int4,
    unpack_low_first,
    unpack_matmul_nbits,
    unpack_matmul_nbits_zero_points,
)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_low_first_round_trip_with_padding(bits):
    rng = np.random.default_rng(bits)
    values = rng.integers(0, 1 << bits, size=(3, 13))
    packed = pack_low_first(values, bits)
    assert packed.shape == (3, -(-13 * bits // 8))
    np.testing.assert_array_equal(unpack_low_first(packed, bits, 13), values)


def test_low_first_bit_order():
    assert pack_low_first(np.array([1, 2]), 4).tolist() == [0x21]
    assert pack_low_first(np.array([1, 2, 3, 0]), 2).tolist() == [0b00111001]
    with pytest.raises(ValueError, match="values must lie"):
        pack_low_first(np.array([16]), 4)


@pytest.mark.parametrize("signed", [True, False])
def test_int4_matches_onnx_numpy_helper(signed):
    rng = np.random.default_rng(0)
    lo, hi = (-8, 7) if signed else (0, 15)
    values = rng.integers(lo, hi + 1, size=(5, 7))  # odd count: last high nibble is padding
    ours = int4_tensor_proto("w", values, signed)
    theirs = numpy_helper.from_array(values.astype(ml_dtypes.int4 if signed else ml_dtypes.uint4), "w")
    assert ours.data_type == theirs.data_type and list(ours.dims) == [5, 7]
    assert ours.raw_data == theirs.raw_data
    np.testing.assert_array_equal(numpy_helper.to_array(ours).astype(np.int64), values)
    np.testing.assert_array_equal(unpack_int4(pack_int4(values, signed), (5, 7), signed), values)


def test_int4_range_checked():
    with pytest.raises(ValueError, match="INT4"):
        pack_int4(np.array([8]), signed=True)
    with pytest.raises(ValueError, match="UINT4"):
        pack_int4(np.array([-1]), signed=False)


@pytest.mark.parametrize(("bits", "k", "block"), [(4, 64, 32), (4, 72, 32), (2, 40, 16), (8, 50, 16), (4, 300, 256)])
def test_matmul_nbits_round_trip(bits, k, block):
    rng = np.random.default_rng(k)
    n = 6
    codes = rng.integers(0, 1 << bits, size=(n, k))
    packed = pack_matmul_nbits(codes, bits, block)
    assert packed.shape == matmul_nbits_shapes(k, n, bits, block)["B"] == (n, -(-k // block), block * bits // 8)
    np.testing.assert_array_equal(unpack_matmul_nbits(packed, k, bits, block), codes)
    zeros = rng.integers(0, 1 << bits, size=(n, -(-k // block)))
    zp = pack_matmul_nbits_zero_points(zeros, bits)
    assert zp.shape == matmul_nbits_shapes(k, n, bits, block)["zero_points"]
    np.testing.assert_array_equal(unpack_matmul_nbits_zero_points(zp, bits, zeros.shape[1]), zeros)


def test_matmul_nbits_rejects_bad_block():
    with pytest.raises(ValueError, match="power of two"):
        pack_matmul_nbits(np.zeros((2, 40), np.uint8), 4, 24)
    with pytest.raises(ValueError, match="does not fit"):
        unpack_matmul_nbits(np.zeros((2, 2, 16), np.uint8), 100, 4, 32)


@pytest.mark.parametrize(("bits", "with_zero_points"), [(4, False), (4, True), (2, True), (8, False)])
def test_onnxruntime_reads_our_matmul_nbits_layout(bits, with_zero_points):
    """ORT's kernel is the ground truth for the layout: its output must equal A · Wᵀ of our dequantized W."""
    rng = np.random.default_rng(bits)
    k, n, block = 72, 24, 32  # partial last block
    k_blocks = -(-k // block)
    codes = rng.integers(0, 1 << bits, size=(n, k)).astype(np.uint8)
    scales = rng.uniform(0.5, 1.5, size=(n, k_blocks)).astype(np.float32)
    zeros = (rng.integers(0, 1 << bits, size=(n, k_blocks)) if with_zero_points
             else np.full((n, k_blocks), 1 << (bits - 1)))
    per_k = np.repeat(np.arange(k_blocks), block)[:k]
    w = (codes.astype(np.float64) - zeros[:, per_k]) * scales[:, per_k]  # [N, K]
    inits = [numpy_helper.from_array(pack_matmul_nbits(codes, bits, block), "B"), numpy_helper.from_array(scales, "s")]
    inputs = ["A", "B", "s"]
    if with_zero_points:
        inits.append(numpy_helper.from_array(pack_matmul_nbits_zero_points(zeros.astype(np.uint8), bits), "zp"))
        inputs.append("zp")
    node = helper.make_node("MatMulNBits", inputs, ["Y"], domain="com.microsoft", K=k, N=n, bits=bits,
                            block_size=block, accuracy_level=0)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [3, k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [3, n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)],
                              ir_version=10)
    onnx.checker.check_model(model)
    a = rng.normal(size=(3, k)).astype(np.float32)
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"A": a})[0]
    np.testing.assert_allclose(y, a.astype(np.float64) @ w.T, rtol=1e-5, atol=1e-4)
