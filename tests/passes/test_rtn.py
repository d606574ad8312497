"""WeightOnlyRTN and the two weight-only lowerings (standard INT4 Q/DQ, ORT MatMulNBits)."""

import re

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qcompiler.algorithms.weight_quant import quantize_rtn
from qcompiler.config import WeightLowering, WeightOnlyConfig
from qcompiler.graph import KEEP_FLOAT_SUFFIX, export_graph, import_graph
from qcompiler.pass_manager import PassContext
from qcompiler.passes.rtn import WeightOnlyRTN
from tests.helpers import run_ort, sqnr_db


def mlp_model(rng, k=64, hidden=96, n=48, opset=18):
    """Two weighted GEMMs, one of them a Gemm with transB and bias, plus a tiny GEMM; Tanh keeps the
    GEMMs off the graph outputs (the LM-head rule)::

        x --MatMul(W1 [K,H]) "fc1"--> h --Relu--> r --Gemm(W2 [N,H], b2, transB=1) "fc2"--> m --Tanh--> y
                                                  r --MatMul(Wt [H,4]) "tiny"--> t --Tanh--> z
    """
    w1 = (rng.normal(size=(k, hidden)) / np.sqrt(k)).astype(np.float32)
    w2 = (rng.normal(size=(n, hidden)) / np.sqrt(hidden)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Gemm", ["r", "w2", "b2"], ["m"], name="fc2", transB=1),
             helper.make_node("MatMul", ["r", "wt"], ["t"], name="tiny"),
             helper.make_node("Tanh", ["m"], ["y"], name="tanh_y"),
             helper.make_node("Tanh", ["t"], ["z"], name="tanh_z")]
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"),
             numpy_helper.from_array(rng.normal(size=n).astype(np.float32), "b2"),
             numpy_helper.from_array(rng.normal(size=(hidden, 4)).astype(np.float32), "wt")]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", n]),
                               helper.make_tensor_value_info("z", TensorProto.FLOAT, ["rows", 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


def negative_model(rng, k=32, n=32):
    """GEMMs a weight-only pass must leave alone::

        x --MatMul(Ws) "shared_a"--> a --+                 (Ws shared by two nodes)
        x --MatMul(Ws) "shared_b"--> b --+--Add--> s --MatMul(wi: graph input) "input_weight"--> u
        x --Transpose, Relu--> MatMul(xᵀ, relu(x)) "dynamic"   (activation x activation)
        x --MatMul(W) "head"--> logits                      (produces a graph output: the LM head)
    """
    ws = rng.normal(size=(k, n)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "ws"], ["a"], name="shared_a"),
             helper.make_node("MatMul", ["x", "ws"], ["b"], name="shared_b"),
             helper.make_node("Add", ["a", "b"], ["s"]),
             helper.make_node("MatMul", ["s", "wi"], ["u"], name="input_weight"),
             helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0]),
             helper.make_node("Relu", ["x"], ["xr"]),
             helper.make_node("MatMul", ["xt", "xr"], ["g"], name="dynamic"),
             helper.make_node("MatMul", ["x", "wh"], ["logits"], name="head")]
    inits = [numpy_helper.from_array(ws, "ws"), numpy_helper.from_array(rng.normal(size=(k, 64)).astype(np.float32), "wh")]
    graph = helper.make_graph(
        nodes, "negative",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, k]), helper.make_tensor_value_info("wi", TensorProto.FLOAT, [n, n])],
        [helper.make_tensor_value_info("u", TensorProto.FLOAT, [8, n]), helper.make_tensor_value_info("g", TensorProto.FLOAT, [k, k]),
         helper.make_tensor_value_info("logits", TensorProto.FLOAT, [8, 64])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def apply(pass_, model, context=None):
    graph = import_graph(model)
    result = pass_.run(graph, context or PassContext())
    graph.cleanup().toposort()
    out = export_graph(graph)
    onnx.checker.check_model(out)
    return out, result


def producers(model):
    return {o: n for n in model.graph.node for o in n.output}


def initializer(model, name):
    return next(t for t in model.graph.initializer if t.name == name)


def reference_output(model, x, config):
    """The float graph evaluated with round-to-nearest weights, in numpy."""
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    w1 = quantize_rtn(weights["w1"], config.bits, config.group_size, config.symmetric).dequantize()
    w2 = quantize_rtn(weights["w2"].T, config.bits, config.group_size, config.symmetric).dequantize()
    r = np.maximum(x.astype(np.float64) @ w1, 0)
    return np.tanh(r @ w2 + weights["b2"])


def test_qdq_lowering_structure():
    rng = np.random.default_rng(0)
    out, result = apply(WeightOnlyRTN(WeightOnlyConfig(group_size=32, lowering=WeightLowering.QDQ)), mlp_model(rng))
    assert sorted(d["node"] for d in result.details) == ["fc1", "fc2"]
    assert ("tiny", "tiny GEMM (K=96, N=4 < 16)") in result.not_fired
    assert out.opset_import[0].version == 21
    nodes = {n.name: n for n in out.graph.node}
    made_by = producers(out)
    for name, (k, n) in (("fc1", (64, 96)), ("fc2", (96, 48))):
        assert nodes[name].op_type == "MatMul"
        dq = made_by[nodes[name].input[1]]  # DequantizeLinear feeds the MatMul directly: no Transpose
        assert dq.op_type == "DequantizeLinear" and len(dq.input) == 2  # symmetric: no zero point
        attrs = {a.name: helper.get_attribute_value(a) for a in dq.attribute}
        assert attrs == {"axis": 0, "block_size": 32}
        codes, scale = initializer(out, dq.input[0]), initializer(out, dq.input[1])
        assert codes.data_type == TensorProto.INT4 and list(codes.dims) == [k, n]
        assert list(scale.dims) == [-(-k // 32), n]
    # Gemm's bias survives as an Add after the MatMul.
    add = next(n for n in out.graph.node if n.op_type == "Add")
    assert add.input[0] == nodes["fc2"].output[0] and add.input[1] == "b2" and add.output[0] == "m"
    assert nodes["tiny"].input[1] == "wt"


def test_matmul_nbits_lowering_structure():
    rng = np.random.default_rng(1)
    config = WeightOnlyConfig(group_size=32, lowering=WeightLowering.MATMUL_NBITS)
    out, result = apply(WeightOnlyRTN(config), mlp_model(rng))
    assert out.opset_import[0].version == 18  # contrib op: no opset change needed
    assert any(o.domain == "com.microsoft" for o in out.opset_import)
    nodes = {n.name: n for n in out.graph.node}
    for name, (k, n) in (("fc1", (64, 96)), ("fc2", (96, 48))):
        node = nodes[name]
        assert node.op_type == "MatMulNBits" and node.domain == "com.microsoft" and len(node.input) == 3
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        assert attrs == {"K": k, "N": n, "bits": 4, "block_size": 32, "accuracy_level": 4}
        assert list(initializer(out, node.input[1]).dims) == [n, -(-k // 32), 16]
        assert list(initializer(out, node.input[2]).dims) == [n, -(-k // 32)]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [None, 16, 64])
@pytest.mark.parametrize("lowering", list(WeightLowering))
def test_lowered_graph_computes_the_rtn_weights_exactly(bits, symmetric, group_size, lowering):
    rng = np.random.default_rng(bits)
    model = mlp_model(rng, k=80)  # K=80: partial last group for 64
    config = WeightOnlyConfig(bits=bits, group_size=group_size, symmetric=symmetric, lowering=lowering,
                              accuracy_level=0)
    out, result = apply(WeightOnlyRTN(config), model)
    assert len(result.details) == 2
    x = rng.normal(size=(16, 80)).astype(np.float32)
    y = run_ort(out, {"x": x})[0]
    np.testing.assert_allclose(y, reference_output(model, x, config), rtol=1e-4, atol=1e-5)
    floor = {2: 0.0, 3: 8.0, 4: 14.0, 8: 35.0}[bits]
    assert sqnr_db(run_ort(model, {"x": x})[0], y) > floor


@pytest.mark.parametrize("symmetric", [True, False])
def test_lowerings_agree_in_onnxruntime(symmetric):
    rng = np.random.default_rng(4)
    model = mlp_model(rng)
    x = rng.normal(size=(32, 64)).astype(np.float32)
    def output(lowering, level, optimize):
        config = WeightOnlyConfig(group_size=32, symmetric=symmetric, lowering=lowering, accuracy_level=level)
        return run_ort(apply(WeightOnlyRTN(config), model)[0], {"x": x}, optimize=optimize)[0]

    # Unoptimized, DequantizeLinear -> MatMul is evaluated literally: the exact reference.
    qdq = output(WeightLowering.QDQ, 0, optimize=False)
    np.testing.assert_allclose(output(WeightLowering.MATMUL_NBITS, 0, optimize=True), qdq, rtol=1e-5, atol=1e-5)
    # accuracy_level 4 lets ORT quantize A to int8 blocks: close, not identical. ORT's full optimization
    # also rewrites the QDQ lowering into MatMulNBits with accuracy_level 4 by default.
    assert sqnr_db(qdq, output(WeightLowering.MATMUL_NBITS, 4, optimize=True)) > 35.0
    assert sqnr_db(qdq, output(WeightLowering.QDQ, 0, optimize=True)) > 35.0


def test_fp16_model_keeps_fp16_scales():
    rng = np.random.default_rng(5)
    model = mlp_model(rng)
    for t in model.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
    for v in list(model.graph.input) + list(model.graph.output):
        v.type.tensor_type.elem_type = TensorProto.FLOAT16
    x = rng.normal(size=(8, 64)).astype(np.float16)
    ref = run_ort(model, {"x": x})[0].astype(np.float32)
    for lowering in WeightLowering:
        out, _ = apply(WeightOnlyRTN(WeightOnlyConfig(group_size=32, lowering=lowering, accuracy_level=0)), model)
        scales = [t for t in out.graph.initializer if "scale" in t.name]
        assert scales and all(t.data_type == TensorProto.FLOAT16 for t in scales)
        assert sqnr_db(ref, run_ort(out, {"x": x})[0].astype(np.float32)) > 14.0


def test_w4_g128_weights_take_under_a_third_of_fp16():
    rng = np.random.default_rng(6)
    model = mlp_model(rng, k=512, hidden=512, n=256)
    fp16_bytes = sum(numpy_helper.to_array(initializer(model, w)).size * 2 for w in ("w1", "w2"))
    for lowering in WeightLowering:
        out, _ = apply(WeightOnlyRTN(WeightOnlyConfig(group_size=128, lowering=lowering)), model)
        quantized = sum(t.ByteSize() for t in out.graph.initializer if t.name.startswith(("w1/", "w2/")))
        assert quantized <= 0.3 * fp16_bytes, (lowering, quantized / fp16_bytes)


def test_does_not_fire_on_shared_input_dynamic_or_head_weights():
    rng = np.random.default_rng(7)
    model = negative_model(rng)
    out, result = apply(WeightOnlyRTN(WeightOnlyConfig(group_size=16)), model)
    assert not result.changed and not result.details
    reasons = dict(result.not_fired)
    assert reasons["shared_a"] == reasons["shared_b"] == "weight shared with other nodes"
    assert reasons["input_weight"] == "weight is a graph input, not a constant initializer"
    assert reasons["head"].startswith("produces a graph output")
    assert "dynamic" not in reasons  # activation x activation: not a weighted GEMM at all
    assert sorted(n.op_type for n in out.graph.node) == sorted(n.op_type for n in model.graph.node)
    feeds = {"x": rng.normal(size=(8, 32)).astype(np.float32), "wi": rng.normal(size=(32, 32)).astype(np.float32)}
    for ref, got in zip(run_ort(model, feeds), run_ort(out, feeds), strict=True):
        np.testing.assert_array_equal(ref, got)
    # The LM head is quantized when asked for.
    _, with_head = apply(WeightOnlyRTN(WeightOnlyConfig(group_size=16, quantize_lm_head=True)), model)
    assert [d["node"] for d in with_head.details] == ["head"]


def test_excluded_and_keep_float_nodes_are_left_alone():
    rng = np.random.default_rng(8)
    model = mlp_model(rng)
    model.graph.node[0].name = "fc1" + KEEP_FLOAT_SUFFIX
    _, result = apply(WeightOnlyRTN(WeightOnlyConfig(group_size=32)), model,
                      PassContext(exclude=[re.compile("^fc2$")]))
    reasons = dict(result.not_fired)
    assert reasons["fc1" + KEEP_FLOAT_SUFFIX].startswith("kept in float")
    assert reasons["fc2"] == "excluded by name"
    assert not result.changed


def test_gemm_beta_is_folded_into_the_bias():
    rng = np.random.default_rng(9)
    model = mlp_model(rng)
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    gemm.attribute.append(helper.make_attribute("beta", 0.5))
    config = WeightOnlyConfig(group_size=32, lowering=WeightLowering.QDQ)
    out, _ = apply(WeightOnlyRTN(config), model)
    x = rng.normal(size=(8, 64)).astype(np.float32)
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    w1 = quantize_rtn(weights["w1"], 4, 32, True).dequantize()
    w2 = quantize_rtn(weights["w2"].T, 4, 32, True).dequantize()
    expected = np.tanh(np.maximum(x @ w1, 0) @ w2 + 0.5 * weights["b2"])
    np.testing.assert_allclose(run_ort(out, {"x": x})[0], expected, rtol=1e-4, atol=1e-5)


def test_input_model_is_not_modified():
    rng = np.random.default_rng(10)
    model = mlp_model(rng)
    before = model.SerializeToString()
    apply(WeightOnlyRTN(WeightOnlyConfig(group_size=32)), model)
    assert model.SerializeToString() == before
