"""InsertQDQ: Q/DQ on the inputs of weighted GEMMs only, with accurate W8A8 numerics."""

import numpy as np
import onnx
import pytest

from qcompiler.calibration import iterate_feeds
from qcompiler.config import ActivationScheme, RangeMethod, W8A8Config
from qcompiler.graph import export_graph, import_graph
from qcompiler.pass_manager import PassContext
from qcompiler.passes.insert_qdq import InsertQDQ
from tests.helpers import gemm_input_stats, run_ort, sqnr_db
from tests.passes.graphs import two_linear_model


def _quantize(model, arrays, config, **context):
    graph = import_graph(model)
    ctx = PassContext(stats=gemm_input_stats(model, arrays), calibration_feeds=iterate_feeds(arrays), **context)
    result = InsertQDQ(config).run(graph, ctx)
    graph.cleanup().toposort()
    out = export_graph(graph)
    onnx.checker.check_model(out)
    return out, result


def _consumers(model, name):
    return [n for n in model.graph.node if name in n.input]


@pytest.mark.parametrize("scheme", list(ActivationScheme))
def test_qdq_on_weighted_gemm_inputs_only(scheme):
    rng = np.random.default_rng(0)
    model = two_linear_model(rng)
    arrays = {"x": rng.normal(size=(48, 32)).astype(np.float32)}
    out, result = _quantize(model, arrays, W8A8Config(activation=scheme))
    assert sorted(d["node"] for d in result.details) == ["fc1", "fc2"]
    assert ("tiny", "tiny GEMM (K=32, N=4 < 16)") in result.not_fired
    nodes = {n.name: n for n in out.graph.node}
    producers = {o: n for n in out.graph.node for o in n.output}
    for name in ("fc1", "fc2"):
        assert all(producers[i].op_type == "DequantizeLinear" for i in nodes[name].input[:2])
        assert not any(c.op_type == "QuantizeLinear" for c in _consumers(out, nodes[name].output[0])), "outputs stay float"
    assert producers[nodes["tiny"].input[0]].op_type == "Relu"
    # fc1 and fc2 read one activation: one quantizer serves both.
    assert nodes["fc1"].input[0] == nodes["fc2"].input[0]
    feed = {"x": rng.normal(size=(12, 32)).astype(np.float32)}
    for ref, got in zip(run_ort(model, feed)[:2], run_ort(out, feed)[:2], strict=True):
        assert sqnr_db(ref, got) > 30.0


def test_percentile_range_clips_below_max():
    rng = np.random.default_rng(1)
    model = two_linear_model(rng)
    x = rng.normal(size=(48, 32)).astype(np.float32)
    x[0, 0] = 500.0  # one extreme value
    arrays = {"x": x}
    out_max, _ = _quantize(model, arrays, W8A8Config(activation=ActivationScheme.PER_TENSOR_STATIC))
    out_pct, _ = _quantize(model, arrays, W8A8Config(activation=ActivationScheme.PER_TENSOR_STATIC,
                                                     range_method=RangeMethod.PERCENTILE, percentile=99.0))
    scale_max, scale_pct = (next(onnx.numpy_helper.to_array(t) for t in m.graph.initializer if t.name == "h/act_scale")
                            for m in (out_max, out_pct))
    assert scale_pct < scale_max / 10


def test_does_not_fire_on_dynamic_weight_or_excluded_nodes():
    rng = np.random.default_rng(2)
    model = two_linear_model(rng)
    arrays = {"x": rng.normal(size=(24, 32)).astype(np.float32)}
    import re
    out, result = _quantize(model, arrays, W8A8Config(), exclude=[re.compile("fc")])
    assert not result.changed
    assert {n for n, _ in result.not_fired} == {"fc1", "fc2", "tiny"}
    assert not any(n.op_type == "QuantizeLinear" for n in out.graph.node)


def test_static_scales_need_statistics():
    model = two_linear_model(np.random.default_rng(3))
    with pytest.raises(ValueError, match="calibration statistics"):
        InsertQDQ(W8A8Config(activation=ActivationScheme.PER_TENSOR_STATIC)).run(import_graph(model), PassContext())
