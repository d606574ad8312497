"""LowerW8A8Gemm: per-token W8A8 Q/DQ GEMMs -> QuantizePerToken + W8A8Gemm (TensorRT plugins).

    x ─ Relu ─ h ─┬─ [per-token Q/DQ] ─ MatMul(DQ(W1 int8))        ─ Tanh ─ y1
                  └─ [the same Q/DQ]  ─ Gemm(DQ(W2 int8), b2, transB) ─ Tanh ─ y2
    becomes  h ─ QuantizePerToken ─ (h_q, s) ─┬─ W8A8Gemm(W1^T)     ─ Cast ─ Tanh ─ y1
                                              └─ W8A8Gemm(W2, b2)   ─ Cast ─ Tanh ─ y2

The plugin ops have no ONNX Runtime kernels: the lowered graph runs with their numpy references
(qcompiler.backends.plugin_graph) and must equal ONNX Runtime's Q/DQ graph up to W8A8Gemm's float16 output.
"""

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from qcompiler.backends.plugin_graph import run_plugin_graph
from qcompiler.calibration import iterate_feeds
from qcompiler.config import ActivationScheme, W8A8Config
from qcompiler.graph import export_graph, import_graph
from qcompiler.pass_manager import PassContext
from qcompiler.passes.fuse_attention import FuseAttention
from qcompiler.passes.fuse_quant import FuseQuant
from qcompiler.passes.insert_qdq import InsertQDQ
from qcompiler.passes.lower_w8a8_gemm import LowerW8A8Gemm
from tests.helpers import gemm_input_stats, run_ort, sqnr_db
from tests.passes.graphs import decoder_model, make_model, two_linear_model


def _qdq(model, scheme=ActivationScheme.PER_TOKEN_DYNAMIC):
    graph = import_graph(model)
    arrays = {"x": np.random.default_rng(1).normal(size=(8, 32)).astype(np.float32)}
    stats = gemm_input_stats(model, arrays) if scheme == ActivationScheme.PER_TENSOR_STATIC else None
    InsertQDQ(W8A8Config(activation=scheme)).run(graph, PassContext(stats=stats, calibration_feeds=iterate_feeds(arrays)))
    FuseQuant(target="tensorrt").run(graph, PassContext())
    return graph


def test_lowers_matmul_and_gemm_sharing_one_quantizer():
    graph = _qdq(two_linear_model(np.random.default_rng(0)))
    qdq = export_graph(graph)
    result = LowerW8A8Gemm().run(graph, PassContext())
    assert [d["node"] for d in result.details] == ["fc1", "fc2"] and [d["bias"] for d in result.details] == [False, True]
    lowered = export_graph(graph)
    ops = [n.op_type for n in lowered.graph.node]
    assert ops.count("W8A8Gemm") == 2 and ops.count("QuantizePerToken") == 1
    assert not {"QuantizeLinear", "DequantizeLinear", "ReduceMax", "ReduceMin"} & set(ops)
    assert ops.count("MatMul") == 1  # the tiny GEMM InsertQDQ skipped stays float
    feeds = {"x": np.random.default_rng(2).normal(size=(5, 32)).astype(np.float32)}
    for want, got in zip(run_ort(qdq, feeds), run_plugin_graph(lowered, feeds), strict=True):
        np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3)  # float16 output of W8A8Gemm


def test_declines_static_per_tensor_scales():
    graph = _qdq(two_linear_model(np.random.default_rng(0)), ActivationScheme.PER_TENSOR_STATIC)
    result = LowerW8A8Gemm().run(graph, PassContext())
    assert not result.changed and len(result.not_fired) == 2
    assert all("static per-tensor" in why for _, why in result.not_fired)


def test_ignores_float_gemms():
    result = LowerW8A8Gemm().run(import_graph(two_linear_model(np.random.default_rng(0))), PassContext())
    assert not result.changed and not result.not_fired


def test_decoder_plugin_graph_is_as_accurate_as_its_qdq_graph():
    """Every projection W8A8Gemm, every attention FlashAttention. W8A8Gemm's float16 outputs move some
    int8 roundings downstream, so the two graphs differ by more than one GEMM's rounding (1.4% here);
    against the float model they must be equally accurate."""
    model = decoder_model(np.random.default_rng(0))
    graph = import_graph(model)
    InsertQDQ(W8A8Config(activation=ActivationScheme.PER_TOKEN_DYNAMIC)).run(graph, PassContext())
    FuseQuant(target="tensorrt").run(graph, PassContext())
    qdq = export_graph(graph)
    lowered = LowerW8A8Gemm().run(graph, PassContext())
    fused = FuseAttention("plugin", max_seq_len=256).run(graph, PassContext())
    assert len(lowered.details) == 14 and len(fused.details) == 2
    plugins = export_graph(graph)
    quantizers = [n for n in plugins.graph.node if n.op_type == "QuantizePerToken"]
    norms = [helper.get_attribute_value(a) for n in quantizers for a in n.attribute if a.name == "norm"]
    assert sorted(norms) == [b"none"] * 4 + [b"rms"] * 4  # attention and MLP norms moved into their quantizers
    assert [n.op_type for n in plugins.graph.node].count("ReduceMean") == 1  # only the final norm (float LM head)
    feeds = {"input_ids": np.random.default_rng(1).integers(0, 384, (2, 37))}
    reference = run_ort(model, feeds)[0]
    qdq_db, plugin_db = sqnr_db(reference, run_ort(qdq, feeds)[0]), sqnr_db(reference, run_plugin_graph(plugins, feeds)[0])
    assert plugin_db > qdq_db - 1.0, (qdq_db, plugin_db)


def _layer_norm_model(also_read: bool):
    """x ─ LayerNormalization(gain, bias) ─ h ─┬─ MatMul(W1) ─ y1
                                               └─ MatMul(W2) ─ y2   [h + x ─ y3 when ``also_read``]"""
    rng = np.random.default_rng(5)
    inits = [numpy_helper.from_array(rng.normal(1, 0.2, 32).astype(np.float32), "gain"),
             numpy_helper.from_array(rng.normal(0, 0.2, 32).astype(np.float32), "bias")]
    inits += [numpy_helper.from_array(rng.normal(size=(32, 24)).astype(np.float32), f"w{i}") for i in (1, 2)]
    nodes = [helper.make_node("LayerNormalization", ["x", "gain", "bias"], ["h"], axis=-1, epsilon=1e-5),
             helper.make_node("MatMul", ["h", "w1"], ["m1"], name="fc1"), helper.make_node("MatMul", ["h", "w2"], ["m2"], name="fc2")]
    nodes += [helper.make_node("Tanh", [f"m{i}"], [f"y{i}"]) for i in (1, 2)]
    outputs = [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, ["rows", 24]) for i in (1, 2)]
    if also_read:
        nodes.append(helper.make_node("Add", ["h", "x"], ["y3"]))
        outputs.append(helper.make_tensor_value_info("y3", TensorProto.FLOAT, ["rows", 32]))
    return make_model(nodes, inits, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", 32])], outputs, opset=21)


@pytest.mark.parametrize("also_read", [False, True])
def test_layer_norm_moves_into_the_quantizer_unless_read_elsewhere(also_read):
    graph = _qdq(_layer_norm_model(also_read))
    qdq = export_graph(graph)
    result = LowerW8A8Gemm().run(graph, PassContext())
    lowered = export_graph(graph)
    (quantizer,) = [n for n in lowered.graph.node if n.op_type == "QuantizePerToken"]
    attrs = {a.name: helper.get_attribute_value(a) for a in quantizer.attribute}
    ops = [n.op_type for n in lowered.graph.node]
    if also_read:  # the normalised tensor is still needed: the norm stays
        assert attrs["norm"] == b"none" and "LayerNormalization" in ops and "0 with their" in result.summary
    else:
        assert attrs["norm"] == b"layer" and abs(attrs["epsilon"] - 1e-5) < 1e-9 and "LayerNormalization" not in ops
        assert list(quantizer.input)[0] == "x" and len(quantizer.input) == 3
    feeds = {"x": np.random.default_rng(2).normal(size=(5, 32)).astype(np.float32) * 3}
    for want, got in zip(run_ort(qdq, feeds), run_plugin_graph(lowered, feeds), strict=True):
        np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3)


def test_declines_a_scale_it_does_not_recognise():
    """A per-row scale that is not max|x| / 127 (here / 100) would change the function: declined."""
    graph = _qdq(two_linear_model(np.random.default_rng(0)))
    (qmax,) = [t for t in graph.tensors().values() if t.name.endswith("/per_token/qmax")]
    qmax.values = np.array(100.0, np.float32)
    result = LowerW8A8Gemm().run(graph, PassContext())
    assert not result.changed and all("not max|x| / 127" in why for _, why in result.not_fired), result.not_fired
