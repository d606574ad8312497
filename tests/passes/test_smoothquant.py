"""SmoothQuant: folding is exact, lands in the right producer, and declines what it cannot fold."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qcompiler.calibration import iterate_feeds
from qcompiler.config import SmoothQuantConfig
from qcompiler.graph import export_graph, import_graph
from qcompiler.pass_manager import PassContext
from qcompiler.passes.smoothquant import SmoothQuant
from tests.helpers import gemm_input_stats, run_ort

K, N, T = 16, 24, 10


def _init(name, array):
    return numpy_helper.from_array(np.asarray(array, np.float32), name)


def _model(nodes, inits, inputs, outputs, opset=18):
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


def rmsnorm_qk_model(rng):
    """x -> Pow/ReduceMean/Add/Sqrt/Div -> Mul(gain) -> {MatMul Wq, MatMul Wk}; channel 3 has outliers.

        x --rmsnorm--> *gain --+--> MatMul(Wq) --> q
                               +--> MatMul(Wk) --> k
    """
    gain = np.ones(K, np.float32)
    gain[3] = 40.0  # outlier channel, as the builders inject it
    nodes = [
        helper.make_node("Pow", ["x", "two"], ["sq"]),
        helper.make_node("ReduceMean", ["sq", "axes"], ["ms"], keepdims=1),
        helper.make_node("Add", ["ms", "eps"], ["mse"]),
        helper.make_node("Sqrt", ["mse"], ["rms"]),
        helper.make_node("Div", ["x", "rms"], ["xhat"]),
        helper.make_node("Mul", ["xhat", "gain"], ["h"], name="norm_gain"),
        helper.make_node("MatMul", ["h", "wq"], ["q"], name="q_proj"),
        helper.make_node("MatMul", ["h", "wk"], ["k"], name="k_proj"),
    ]
    inits = [_init("two", 2.0), numpy_helper.from_array(np.array([-1], np.int64), "axes"), _init("eps", 1e-6),
             _init("gain", gain), _init("wq", rng.normal(size=(K, N))), _init("wk", rng.normal(size=(K, N)))]
    io = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, T, K])]
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, T, N]) for n in ("q", "k")]
    return _model(nodes, inits, io, outs)


def swiglu_model(rng):
    """x -> {gate, up} MatMuls -> silu(gate) * up -> MatMul(down); down's input folds into up's columns.

        x --+--> MatMul(Wg) --> g --> g*Sigmoid(g) --+
            +--> MatMul(Wu) --> u -------------------*--> MatMul(Wd) --> y
    """
    wu = rng.normal(size=(K, N))
    wu[:, 5] *= 30.0  # outlier channel 5 in down's input
    nodes = [
        helper.make_node("MatMul", ["x", "wg"], ["g"], name="gate_proj"),
        helper.make_node("MatMul", ["x", "wu"], ["u"], name="up_proj"),
        helper.make_node("Sigmoid", ["g"], ["sg"]),
        helper.make_node("Mul", ["g", "sg"], ["silu"]),
        helper.make_node("Mul", ["silu", "u"], ["hidden"], name="gate_mul"),
        helper.make_node("MatMul", ["hidden", "wd"], ["y"], name="down_proj"),
    ]
    inits = [_init("wg", rng.normal(size=(K, N))), _init("wu", wu), _init("wd", rng.normal(size=(N, K)))]
    io = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, T, K])]
    return _model(nodes, inits, io, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])


def _calib(rng, count=4):
    return {"x": rng.normal(size=(count, T, K)).astype(np.float32)}


def _smooth(model, arrays, **kwargs):
    graph = import_graph(model)
    context = PassContext(stats=gemm_input_stats(model, arrays), calibration_feeds=iterate_feeds(arrays))
    result = SmoothQuant(**kwargs).run(graph, context)
    graph.cleanup().toposort()
    return export_graph(graph), result


def _weights(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def test_folds_into_rmsnorm_gain_exactly():
    rng = np.random.default_rng(0)
    model = rmsnorm_qk_model(rng)
    arrays = _calib(rng)
    smoothed, result = _smooth(model, arrays, config=SmoothQuantConfig(alpha=0.5))
    onnx.checker.check_model(smoothed)
    assert result.changed and "norm_gain" in result.details[0]["absorbed_by"]
    assert [n.op_type for n in smoothed.graph.node].count("Mul") == 1, "no Mul may be inserted"
    before, after = _weights(model), _weights(smoothed)
    assert after["gain"][3] < before["gain"][3] / 2, "the outlier channel's gain must shrink"
    feed = {"x": rng.normal(size=(1, T, K)).astype(np.float32)}
    for a, b in zip(run_ort(model, feed), run_ort(smoothed, feed), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)


def test_folds_into_swiglu_up_projection_exactly():
    rng = np.random.default_rng(1)
    model = swiglu_model(rng)
    smoothed, result = _smooth(model, _calib(rng), config=SmoothQuantConfig(alpha=0.5))
    folded = [d for d in result.details if d["gemms"] == ["down_proj"]]
    assert folded and "up_proj" in folded[0]["absorbed_by"]
    assert [n.op_type for n in smoothed.graph.node].count("Mul") == 2, "only silu and the gate: none inserted"
    feed = {"x": rng.normal(size=(1, T, K)).astype(np.float32)}
    np.testing.assert_allclose(run_ort(smoothed, feed)[0], run_ort(model, feed)[0], rtol=1e-4, atol=1e-4)


def test_auto_alpha_picks_from_grid_and_stays_exact():
    rng = np.random.default_rng(2)
    model = rmsnorm_qk_model(rng)
    smoothed, result = _smooth(model, _calib(rng), config=SmoothQuantConfig(alpha="auto", alpha_grid=(0.2, 0.5, 0.8)))
    assert {d["alpha"] for d in result.details} <= {0.2, 0.5, 0.8}
    feed = {"x": rng.normal(size=(1, T, K)).astype(np.float32)}
    np.testing.assert_allclose(run_ort(smoothed, feed)[0], run_ort(model, feed)[0], rtol=1e-4, atol=1e-4)


def test_graph_input_activation_is_left_alone_unless_mul_allowed():
    """x (graph input) -> MatMul: nothing produces x, so nothing can absorb 1/s."""
    rng = np.random.default_rng(3)
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="proj")
    model = _model([node], [_init("w", rng.normal(size=(K, N)))],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, T, K])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    arrays = _calib(rng)
    unchanged, result = _smooth(model, arrays)
    assert not result.changed and "nothing can absorb" in result.not_fired[0][1]
    np.testing.assert_array_equal(_weights(unchanged)["w"], _weights(model)["w"])

    with_mul, result = _smooth(model, arrays, insert_mul=True)
    assert result.changed and [n.op_type for n in with_mul.graph.node] == ["Mul", "MatMul"]
    feed = {"x": arrays["x"][:1]}
    np.testing.assert_allclose(run_ort(with_mul, feed)[0], run_ort(model, feed)[0], rtol=1e-4, atol=1e-4)


def test_shared_weight_is_not_smoothed():
    rng = np.random.default_rng(4)
    model = rmsnorm_qk_model(rng)
    for node in model.graph.node:
        if node.name == "k_proj":
            node.input[1] = "wq"  # q and k now read one initializer
    smoothed, result = _smooth(model, _calib(rng))
    assert not result.changed and "shared" in result.not_fired[0][1]


def test_needs_statistics():
    model = rmsnorm_qk_model(np.random.default_rng(5))
    with pytest.raises(ValueError, match="calibration statistics"):
        SmoothQuant().run(import_graph(model), PassContext())


def test_shape_readers_do_not_block_folding():
    """TorchScript exports read the norm output's shape (Shape -> Gather -> Reshape targets): Shape
    reads no values, so the gain still absorbs 1/s.

        x --rmsnorm--> *gain --> h --+--> MatMul(Wq), MatMul(Wk)
                                     +--> Shape --> h_shape
    """
    rng = np.random.default_rng(6)
    model = rmsnorm_qk_model(rng)
    model.graph.node.append(helper.make_node("Shape", ["h"], ["h_shape"]))
    model.graph.output.append(helper.make_tensor_value_info("h_shape", TensorProto.INT64, [3]))
    smoothed, result = _smooth(model, _calib(rng), config=SmoothQuantConfig(alpha=0.5))
    assert result.changed and not result.not_fired and "norm_gain" in result.details[0]["absorbed_by"]
    feed = {"x": rng.normal(size=(1, T, K)).astype(np.float32)}
    for a, b in zip(run_ort(model, feed), run_ort(smoothed, feed), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)


def test_value_path_folds_in_a_graph_without_value_info():
    """The V -> O fold probes the channel map with the activation as an extra output; TorchScript exports
    carry no value_info, so that tensor's dtype is unknown to the graph and must be supplied.

        x --MatMul(Wv)--> v ------------+
        s --Softmax--> p --------- MatMul(p, v) --> ctx --MatMul(Wo)--> y
    """
    rng = np.random.default_rng(7)
    wv = rng.normal(size=(K, N))
    wv[:, 2] *= 30.0  # an outlier channel in o_proj's input
    nodes = [helper.make_node("MatMul", ["x", "wv"], ["v"], name="v_proj"),
             helper.make_node("Softmax", ["s"], ["p"], axis=-1),
             helper.make_node("MatMul", ["p", "v"], ["ctx"], name="pv"),
             helper.make_node("MatMul", ["ctx", "wo"], ["y"], name="o_proj")]
    model = _model(nodes, [_init("wv", wv), _init("wo", rng.normal(size=(N, K)))],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, T, K]),
                    helper.make_tensor_value_info("s", TensorProto.FLOAT, [1, T, T])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    assert not model.graph.value_info
    arrays = {"x": rng.normal(size=(4, T, K)).astype(np.float32), "s": rng.normal(size=(4, T, T)).astype(np.float32)}
    smoothed, result = _smooth(model, arrays, config=SmoothQuantConfig(alpha=0.5))
    folded = [d for d in result.details if d["gemms"] == ["o_proj"]]
    assert folded and "v_proj" in folded[0]["absorbed_by"], result.not_fired
    feed = {k: v[:1] for k, v in arrays.items()}
    np.testing.assert_allclose(run_ort(smoothed, feed)[0], run_ort(model, feed)[0], rtol=1e-4, atol=1e-4)


def _fused_model(rng, kind):
    """Fused projections sliced apart along the last axis (Phi-3's gate_up_proj and qkv_proj).

    kind "split" / "slice":   x --MatMul(Wgu [K, 2N])--+--Split/Slice[0:N]--> g --silu--+
                                                        +--Split/Slice[N:2N]--> u ------*--> MatMul(Wd) --> y
    kind "qkv" / "overlap":   x --MatMul(Wqkv [K, 3N])--Slice--> q, k, v;  softmax(q kᵀ) v --> MatMul(Wo) --> y
                              ("overlap": k's slice also reads v's first columns, so V cannot be scaled alone)
    The outlier channel sits in the up / V columns.
    """
    def slice_node(src, out, lo, hi):
        inits.extend([numpy_helper.from_array(np.array([lo], np.int64), f"{out}_lo"),
                      numpy_helper.from_array(np.array([hi], np.int64), f"{out}_hi"),
                      numpy_helper.from_array(np.array([-1], np.int64), f"{out}_axis")])
        return helper.make_node("Slice", [src, f"{out}_lo", f"{out}_hi", f"{out}_axis"], [out])

    inits, io = [], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, T, K])]
    if kind in ("split", "slice"):
        w = rng.normal(size=(K, 2 * N))
        w[:, N + 5] *= 30.0
        nodes = [helper.make_node("MatMul", ["x", "wgu"], ["gu"], name="gate_up_proj")]
        if kind == "split":
            nodes.append(helper.make_node("Split", ["gu"], ["g", "u"], axis=-1, num_outputs=2))
        else:
            nodes += [slice_node("gu", "g", 0, N), slice_node("gu", "u", N, 2 * N)]
        nodes += [helper.make_node("Sigmoid", ["g"], ["sg"]), helper.make_node("Mul", ["g", "sg"], ["silu"]),
                  helper.make_node("Mul", ["silu", "u"], ["hidden"], name="gate_mul"),
                  helper.make_node("MatMul", ["hidden", "wd"], ["y"], name="down_proj")]
        inits += [_init("wgu", w), _init("wd", rng.normal(size=(N, K)))]
    else:
        w = rng.normal(size=(K, 3 * N))
        w[:, 2 * N + 5] *= 30.0
        k_end = 2 * N + 4 if kind == "overlap" else 2 * N
        nodes = [helper.make_node("MatMul", ["x", "wqkv"], ["qkv"], name="qkv_proj"),
                 slice_node("qkv", "q", 0, N), slice_node("qkv", "k", k_end - N, k_end), slice_node("qkv", "v", 2 * N, 3 * N),
                 helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
                 helper.make_node("MatMul", ["q", "kt"], ["s"]), helper.make_node("Softmax", ["s"], ["p"], axis=-1),
                 helper.make_node("MatMul", ["p", "v"], ["ctx"]),
                 helper.make_node("MatMul", ["ctx", "wo"], ["y"], name="o_proj")]
        inits += [_init("wqkv", w / 4), _init("wo", rng.normal(size=(N, K)))]
    return _model(nodes, inits, io, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])


@pytest.mark.parametrize("kind", ["split", "slice", "qkv", "overlap"])
def test_folds_into_the_columns_of_a_fused_projection(kind):
    rng = np.random.default_rng(8)
    model = _fused_model(rng, kind)
    smoothed, result = _smooth(model, _calib(rng), config=SmoothQuantConfig(alpha=0.5))
    consumer, producer = ("down_proj", "gate_up_proj") if kind in ("split", "slice") else ("o_proj", "qkv_proj")
    folded = [d for d in result.details if d["gemms"] == [consumer]]
    if kind == "overlap":
        assert not folded and any("other readers" in why for _, why in result.not_fired), result.not_fired
        return
    assert folded and producer in folded[0]["absorbed_by"], result.not_fired
    before, after = _weights(model), _weights(smoothed)
    weight = "wgu" if producer == "gate_up_proj" else "wqkv"
    scaled = np.any(after[weight] != before[weight], axis=0)
    assert scaled.any() and not scaled[:N].any(), "only the up / V columns may change"
    feed = {"x": rng.normal(size=(1, T, K)).astype(np.float32)}
    np.testing.assert_allclose(run_ort(smoothed, feed)[0], run_ort(model, feed)[0], rtol=1e-4, atol=1e-4)
