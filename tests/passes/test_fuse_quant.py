"""FuseQuant: int8 initializers, merged quantizers, and integer kernels that ONNX Runtime really runs."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from qcompiler.calibration import iterate_feeds
from qcompiler.config import ActivationScheme, W8A8Config
from qcompiler.graph import export_graph, import_graph
from qcompiler.pass_manager import PassContext
from qcompiler.passes.fuse_quant import FuseQuant
from qcompiler.passes.insert_qdq import InsertQDQ
from tests.helpers import gemm_input_stats, run_ort
from tests.passes.graphs import two_linear_model


def _qdq_model(scheme, seed=0):
    rng = np.random.default_rng(seed)
    model = two_linear_model(rng)
    arrays = {"x": rng.normal(size=(48, 32)).astype(np.float32)}
    graph = import_graph(model)
    context = PassContext(stats=gemm_input_stats(model, arrays), calibration_feeds=iterate_feeds(arrays))
    InsertQDQ(W8A8Config(activation=scheme)).run(graph, context)
    graph.cleanup().toposort()
    return model, export_graph(graph), rng


def _fuse(model, target="onnxruntime"):
    graph = import_graph(model)
    result = FuseQuant(target).run(graph, PassContext())
    graph.cleanup().toposort()
    out = export_graph(graph)
    onnx.checker.check_model(out)
    return out, result


def _optimized_ops(model, tmp_path):
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]


@pytest.mark.parametrize("scheme", list(ActivationScheme))
def test_lowered_graph_runs_integer_gemms_and_matches_qdq(scheme, tmp_path):
    _, qdq, rng = _qdq_model(scheme)
    fused, result = _fuse(qdq)
    assert "lowered 2 GEMMs" in result.summary
    ops = _optimized_ops(fused, tmp_path)
    assert ops.count("MatMulIntegerToFloat") == 2
    assert ops.count("MatMul") == 1, "only the tiny float GEMM may stay a float MatMul"
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in fused.graph.initializer}
    assert sum(w.dtype == np.int8 and w.ndim == 2 for w in weights.values()) == 2
    feed = {"x": rng.normal(size=(12, 32)).astype(np.float32)}
    for a, b in zip(run_ort(qdq, feed), run_ort(fused, feed), strict=True):
        # Same integers, same scales: only float summation order differs.
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-3 * np.abs(a).max())


def test_tensorrt_target_folds_weights_but_keeps_standard_qdq():
    _, qdq, rng = _qdq_model(ActivationScheme.PER_TENSOR_STATIC, seed=1)
    fused, result = _fuse(qdq, target="tensorrt")
    ops = [n.op_type for n in fused.graph.node]
    assert "MatMulIntegerToFloat" not in ops and ops.count("QuantizeLinear") == 1  # activation only
    assert ops.count("DequantizeLinear") == 3
    assert "folded 2 weight quantizers" in result.summary
    size_before = sum(t.ByteSize() for t in qdq.graph.initializer)
    size_after = sum(t.ByteSize() for t in fused.graph.initializer)
    assert size_after < 0.5 * size_before
    feed = {"x": rng.normal(size=(12, 32)).astype(np.float32)}
    for a, b in zip(run_ort(qdq, feed), run_ort(fused, feed), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)


def test_merges_duplicate_quantizers_and_drops_redundant_chain():
    """x -> Q -> DQ -> Q -> DQ -> MatMul,  and x -> Q' (duplicate of Q) -> DQ' -> MatMul."""
    from onnx import TensorProto, helper, numpy_helper
    s = numpy_helper.from_array(np.array(0.05, np.float32), "s")
    z = numpy_helper.from_array(np.array(0, np.int8), "z")
    w = numpy_helper.from_array(np.random.default_rng(2).normal(size=(16, 16)).astype(np.float32), "w")
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q1"]),
             helper.make_node("DequantizeLinear", ["q1", "s", "z"], ["d1"]),
             helper.make_node("QuantizeLinear", ["d1", "s", "z"], ["q2"]),
             helper.make_node("DequantizeLinear", ["q2", "s", "z"], ["d2"]),
             helper.make_node("MatMul", ["d2", "w"], ["y1"]),
             helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q3"]),
             helper.make_node("DequantizeLinear", ["q3", "s", "z"], ["d3"]),
             helper.make_node("MatMul", ["d3", "w"], ["y2"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, [4, 16]) for n in ("y1", "y2")], [s, z, w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=10)
    fused, result = _fuse(model, target="tensorrt")
    ops = [n.op_type for n in fused.graph.node]
    assert ops.count("QuantizeLinear") == 1 and ops.count("DequantizeLinear") == 1
    feed = {"x": np.random.default_rng(3).normal(size=(4, 16)).astype(np.float32)}
    for a, b in zip(run_ort(model, feed), run_ort(fused, feed), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-6)


def test_float_graph_is_left_alone():
    model = two_linear_model(np.random.default_rng(4))
    fused, result = _fuse(model)
    assert not result.changed
    assert [n.op_type for n in fused.graph.node] == [n.op_type for n in model.graph.node]
