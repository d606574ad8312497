"""OutlierSplit: LLM.int8()'s outlier columns split off into a float MatMul, exactly, with TensorRT ops."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qcompiler.calibration import TensorStats
from qcompiler.config import ActivationScheme, OutlierSplitConfig, RecipeError, W8A8Config
from qcompiler.errors import CalibrationDataError
from qcompiler.graph import KEEP_FLOAT_SUFFIX, export_graph, import_graph
from qcompiler.pass_manager import PassContext
from qcompiler.passes.insert_qdq import InsertQDQ
from qcompiler.passes.outlier_split import OutlierSplit, masked_stats, outlier_columns
from tests.helpers import gemm_input_stats, run_ort, sqnr_db

OUTLIERS = (3, 17, 40)


def outlier_model(rng, k=48, n=32):
    """Two GEMMs read x (which has outlier channels), one reads Tanh(x) (bounded: no outliers)::

        x --MatMul(W1) "fc1"----------------> Tanh --> y1
        x --Gemm(W2 [N,K], b, transB) "fc2"--> Tanh --> y2
        x --Tanh--> t --MatMul(W3) "fc3"----> Tanh --> y3
    """
    inits = [numpy_helper.from_array(rng.normal(size=(k, n)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(size=(n, k)).astype(np.float32), "w2"),
             numpy_helper.from_array(rng.normal(size=n).astype(np.float32), "b2"),
             numpy_helper.from_array(rng.normal(size=(k, n)).astype(np.float32), "w3")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["m1"], name="fc1"),
             helper.make_node("Gemm", ["x", "w2", "b2"], ["m2"], name="fc2", transB=1),
             helper.make_node("Tanh", ["x"], ["t"]),
             helper.make_node("MatMul", ["t", "w3"], ["m3"], name="fc3")]
    nodes += [helper.make_node("Tanh", [f"m{i}"], [f"y{i}"]) for i in (1, 2, 3)]
    graph = helper.make_graph(nodes, "outliers", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", k])],
                              [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, ["rows", n]) for i in (1, 2, 3)],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def activations(rng, rows, k=48, scale=20.0):
    x = rng.normal(size=(rows, k)).astype(np.float32)
    x[:, list(OUTLIERS)] *= scale
    return x


def split(model, arrays, config=None, **kwargs):
    config = config or OutlierSplitConfig()
    graph = import_graph(model)
    ctx = PassContext(stats=gemm_input_stats(model, arrays, threshold=config.threshold,
                                             relative_threshold=config.relative_threshold), **kwargs)
    result = OutlierSplit(config).run(graph, ctx)
    graph.cleanup().toposort()
    out = export_graph(graph)
    onnx.checker.check_model(out)
    return out, result, ctx


def test_structure_only_mul_gather_matmul_add():
    rng = np.random.default_rng(0)
    model = outlier_model(rng)
    out, result, _ = split(model, {"x": activations(rng, 64)})
    assert {d["node"]: d["float_columns"] for d in result.details} == {"fc1": 3, "fc2": 3}
    assert all(d["columns"] == list(OUTLIERS) for d in result.details)
    assert dict(result.not_fired)["fc3"].startswith("no outlier column")
    nodes = {n.name: n for n in out.graph.node}
    made_by = {o: n for n in out.graph.node for o in n.output}
    inits = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    assert {n.op_type for n in out.graph.node} - {n.op_type for n in model.graph.node} == {"Mul", "Gather", "Add"}
    for name in ("fc1", "fc2"):
        mask = made_by[nodes[name].input[0]]
        assert mask.op_type == "Mul" and mask.input[0] == "x"
        assert np.flatnonzero(inits[mask.input[1]] == 0).tolist() == list(OUTLIERS)
        assert set(np.unique(inits[mask.input[1]]).tolist()) == {0.0, 1.0}
        weight = inits[nodes[name].input[1]]
        rows = weight if name == "fc1" else weight.T  # fc2 is a Gemm with transB
        assert not rows[list(OUTLIERS)].any() and rows.shape[0] == 48
        float_mm = nodes[f"{name}/outliers{KEEP_FLOAT_SUFFIX}"]
        assert float_mm.op_type == "MatMul"
        gather = made_by[float_mm.input[0]]
        assert gather.op_type == "Gather" and helper.get_attribute_value(gather.attribute[0]) == -1
        assert inits[gather.input[1]].tolist() == list(OUTLIERS)
        merge = next(n for n in out.graph.node if n.op_type == "Add" and float_mm.output[0] in n.input)
        assert merge.output[0] == {"fc1": "m1", "fc2": "m2"}[name]
    # One mask and one Gather serve both consumers of x; the Gemm keeps its bias and transB.
    assert nodes["fc1"].input[0] == nodes["fc2"].input[0]
    assert nodes["fc2"].op_type == "Gemm" and nodes["fc2"].input[2] == "b2"
    assert nodes["fc3"].input[0] == "t"


def test_split_is_exact():
    rng = np.random.default_rng(1)
    model = outlier_model(rng)
    out, _, _ = split(model, {"x": activations(rng, 64)})
    x = activations(rng, 20)
    for ref, got in zip(run_ort(model, {"x": x}), run_ort(out, {"x": x}), strict=True):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scheme", list(ActivationScheme))
def test_insert_qdq_quantizes_the_inliers_and_gains_accuracy(scheme):
    rng = np.random.default_rng(2)
    model = outlier_model(rng)
    arrays = {"x": activations(rng, 128)}
    x = activations(rng, 64)
    ref = run_ort(model, {"x": x})
    w8a8 = W8A8Config(activation=scheme)

    out, _, ctx = split(model, arrays)
    graph = import_graph(out)
    qdq = InsertQDQ(w8a8).run(graph, ctx)
    graph.cleanup().toposort()
    split_model = export_graph(graph)
    assert {"fc1", "fc2", "fc3"} <= {d["node"] for d in qdq.details}
    assert dict(qdq.not_fired)[f"fc1/outliers{KEEP_FLOAT_SUFFIX}"].startswith("kept in float")

    graph = import_graph(model)
    InsertQDQ(w8a8).run(graph, PassContext(stats=gemm_input_stats(model, arrays)))
    graph.cleanup().toposort()
    plain_model = export_graph(graph)
    for i in (0, 1):
        with_split, without = sqnr_db(ref[i], run_ort(split_model, {"x": x})[i]), sqnr_db(ref[i], run_ort(plain_model, {"x": x})[i])
        assert with_split > without + 6.0, (scheme, i, with_split, without)


def test_inlier_statistics_are_registered():
    rng = np.random.default_rng(3)
    model = outlier_model(rng)
    x = activations(rng, 64)
    out, _, ctx = split(model, {"x": x})
    inlier_name = next(n for n in out.graph.node if n.name == "fc1").input[0]
    derived = ctx.stats[inlier_name]
    masked = x.copy()
    masked[:, list(OUTLIERS)] = 0
    np.testing.assert_allclose(derived.channel_absmax, np.abs(masked).max(axis=0), rtol=1e-6)
    assert derived.absmax < ctx.stats["x"].absmax / 5
    assert derived.percentile_absmax(99.0) <= derived.absmax


def test_column_selection_rules():
    k = 40
    stats = TensorStats.empty(k, 64, 6.0)
    x = np.ones((1000, k), np.float32)
    x[:500, 2] = 10.0   # 50% of tokens
    x[:5, 7] = 10.0     # 0.5%
    x[:1, 4] = 50.0     # 0.1%, largest magnitude
    stats.update(x)
    assert outlier_columns(stats, OutlierSplitConfig()).tolist() == [2, 4, 7]
    assert outlier_columns(stats, OutlierSplitConfig(min_token_fraction=0.004)).tolist() == [2, 7]
    # At most floor(fraction * K) columns, the most frequent first.
    assert outlier_columns(stats, OutlierSplitConfig(max_float_fraction=0.05)).tolist() == [2, 7]
    assert outlier_columns(stats, OutlierSplitConfig(max_float_fraction=0.02)).tolist() == []
    sub = masked_stats(stats, np.array([4, 7]))
    assert sub.channel_absmax[[2, 4, 7]].tolist() == [10.0, 0.0, 0.0] and sub.max == 10.0
    assert sub.outlier_tokens[[2, 4, 7]].tolist() == [500, 0, 0]


def test_llm_int8_recipe_keeps_a_column_one_token_pushed_past_the_threshold():
    from qcompiler.recipes import BUILTIN_RECIPES

    recipe = BUILTIN_RECIPES["llm-int8"].outlier_split
    stats = TensorStats.empty(40, 64, 6.0, recipe.relative_threshold)
    x = np.ones((5000, 40), np.float32)
    x[:2, 3] = 7.0  # 0.04% of tokens: under the default 0.1% floor, kept by LLM.int8()'s any-token rule
    stats.update(x)
    assert outlier_columns(stats, OutlierSplitConfig()).tolist() == []
    assert outlier_columns(stats, recipe).tolist() == [3]
    with pytest.raises(CalibrationDataError, match="relative"):
        outlier_columns(TensorStats.empty(40, 64, 6.0), recipe)


def test_relative_rule_catches_outlier_features_below_the_absolute_threshold():
    """RMSNorm-scale inputs: three channels at ~12x the token RMS, never near |x| = 6."""
    rng = np.random.default_rng(6)
    model = outlier_model(rng)
    x = 0.1 * activations(rng, 256, scale=12.0)
    assert np.abs(x).max() < 6.0
    absolute_only = OutlierSplitConfig(min_token_fraction=0.0)
    _, result, _ = split(model, {"x": x}, absolute_only)
    assert not result.changed
    relative = OutlierSplitConfig(min_token_fraction=0.0, relative_threshold=6.0, relative_min_token_fraction=0.01)
    out, result, ctx = split(model, {"x": x}, relative)
    assert {d["node"] for d in result.details} == {"fc1", "fc2"}
    assert all(d["columns"] == list(OUTLIERS) for d in result.details)
    ref = run_ort(model, {"x": x})
    np.testing.assert_allclose(run_ort(out, {"x": x})[0], ref[0], rtol=1e-5, atol=1e-5)
    # Per-token W8A8 on the inliers only beats per-token W8A8 on the whole row.
    w8a8 = W8A8Config(activation=ActivationScheme.PER_TOKEN_DYNAMIC)
    quantized = []
    for source, context in ((out, ctx), (model, PassContext(stats=gemm_input_stats(model, {"x": x})))):
        graph = import_graph(source)
        InsertQDQ(w8a8).run(graph, context)
        quantized.append(export_graph(graph.cleanup().toposort()))
    with_split, without = (sqnr_db(ref[0], run_ort(q, {"x": x})[0]) for q in quantized)
    assert with_split > without + 6.0, (with_split, without)


def test_relative_statistics_must_have_been_collected():
    rng = np.random.default_rng(7)
    model = outlier_model(rng)
    stats = gemm_input_stats(model, {"x": activations(rng, 16)})
    with pytest.raises(CalibrationDataError, match="relative"):
        OutlierSplit(OutlierSplitConfig(relative_threshold=6.0)).run(import_graph(model), PassContext(stats=stats))


def test_does_not_fire_without_outliers_or_on_excluded_nodes():
    rng = np.random.default_rng(4)
    model = outlier_model(rng)
    out, result, _ = split(model, {"x": rng.normal(size=(64, 48)).astype(np.float32)})
    assert not result.changed
    assert {name for name, _ in result.not_fired} == {"fc1", "fc2", "fc3"}
    assert sorted(n.op_type for n in out.graph.node) == sorted(n.op_type for n in model.graph.node)
    import re
    _, result, _ = split(model, {"x": activations(rng, 64)}, exclude=[re.compile("fc")])
    assert not result.changed and dict(result.not_fired)["fc1"] == "excluded by name"


def test_statistics_must_exist_and_match_the_threshold():
    rng = np.random.default_rng(5)
    model = outlier_model(rng)
    with pytest.raises(ValueError, match="statistics"):
        OutlierSplit().run(import_graph(model), PassContext())
    stats = gemm_input_stats(model, {"x": activations(rng, 16)}, threshold=3.0)
    with pytest.raises(CalibrationDataError, match="threshold"):
        OutlierSplit(OutlierSplitConfig(threshold=6.0)).run(import_graph(model), PassContext(stats=stats))


@pytest.mark.parametrize("fields", [{"relative_threshold": 1.0}, {"relative_threshold": -4.0},
                                    {"relative_min_token_fraction": 1.5}])
def test_bad_relative_rule_settings_are_refused(fields):
    with pytest.raises(RecipeError, match="relative"):
        OutlierSplitConfig(**fields)
