"""LowerW8A8Gemm: per-token W8A8 Q/DQ GEMMs -> QuantizePerToken + W8A8Gemm (TensorRT plugins).

    x ─ Relu ─ h ─┬─ [per-token Q/DQ] ─ MatMul(DQ(W1 int8))        ─ Tanh ─ y1
                  └─ [the same Q/DQ]  ─ Gemm(DQ(W2 int8), b2, transB) ─ Tanh ─ y2
    becomes  h ─ QuantizePerToken ─ (h_q, s) ─┬─ W8A8Gemm(W1^T)     ─ Cast ─ Tanh ─ y1
                                              └─ W8A8Gemm(W2, b2)   ─ Cast ─ Tanh ─ y2

The plugin ops have no ONNX Runtime kernels: the lowered graph runs with their numpy references
(qcompiler.backends.plugin_graph) and must equal ONNX Runtime's Q/DQ graph up to W8A8Gemm's float16 output.
"""

import numpy as np

from qcompiler.calibration import iterate_feeds
from qcompiler.config import ActivationScheme, W8A8Config
from qcompiler.graph import export_graph, import_graph
from qcompiler.pass_manager import PassContext
from qcompiler.passes.fuse_attention import FuseAttention
from qcompiler.passes.fuse_quant import FuseQuant
from qcompiler.passes.insert_qdq import InsertQDQ
from qcompiler.passes.lower_w8a8_gemm import LowerW8A8Gemm
from tests.helpers import gemm_input_stats, run_ort, run_reference, sqnr_db
from tests.passes.graphs import decoder_model, two_linear_model


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
    for want, got in zip(run_ort(qdq, feeds), run_reference(lowered, feeds), strict=True):
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
    feeds = {"input_ids": np.random.default_rng(1).integers(0, 384, (2, 37))}
    reference = run_ort(model, feeds)[0]
    qdq_db, plugin_db = sqnr_db(reference, run_ort(qdq, feeds)[0]), sqnr_db(reference, run_reference(plugins, feeds)[0])
    assert plugin_db > qdq_db - 1.0, (qdq_db, plugin_db)
