"""Sequential activation capture: stages from topology, and Hessians equal to running the whole
partly-quantized model once per stage (the slow, obviously correct way)."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qcompiler.algorithms.weight_quant import quantize_rtn
from qcompiler.calibration import iterate_feeds
from qcompiler.errors import CalibrationDataError
from qcompiler.graph import import_graph, weighted_gemms
from qcompiler.sequential import gemm_key, plan_stages, run_sequential


def residual_blocks_model(rng, d=32, f=64, blocks=2):
    """Pre-norm-free residual blocks, each an "attention-like" pair and an MLP pair::

        h0 = x
        for each block i:
            a = h @ Wq_i  (and h @ Wk_i, same input)      stage 4i
            h = h + Tanh(a * b) @ Wo_i                      stage 4i+1   (b = h @ Wk_i)
            u = Relu(h @ Wu_i)                              stage 4i+2
            h = h + u @ Wd_i                                stage 4i+3
        y = h @ W_head                                      (graph output: not quantized here)
    """
    nodes, inits = [], []
    h = "x"

    def weight(name, shape):
        inits.append(numpy_helper.from_array((rng.normal(size=shape) / np.sqrt(shape[0])).astype(np.float32), name))
        return name

    for i in range(blocks):
        p = f"b{i}"
        nodes += [helper.make_node("MatMul", [h, weight(f"{p}.wq", (d, d))], [f"{p}.q"], name=f"{p}.q_proj"),
                  helper.make_node("MatMul", [h, weight(f"{p}.wk", (d, d))], [f"{p}.k"], name=f"{p}.k_proj"),
                  helper.make_node("Mul", [f"{p}.q", f"{p}.k"], [f"{p}.qk"]),
                  helper.make_node("Tanh", [f"{p}.qk"], [f"{p}.att"]),
                  helper.make_node("MatMul", [f"{p}.att", weight(f"{p}.wo", (d, d))], [f"{p}.o"], name=f"{p}.o_proj"),
                  helper.make_node("Add", [h, f"{p}.o"], [f"{p}.h1"]),
                  helper.make_node("MatMul", [f"{p}.h1", weight(f"{p}.wu", (d, f))], [f"{p}.u"], name=f"{p}.up_proj"),
                  helper.make_node("Relu", [f"{p}.u"], [f"{p}.r"]),
                  helper.make_node("MatMul", [f"{p}.r", weight(f"{p}.wd", (f, d))], [f"{p}.dn"], name=f"{p}.down_proj"),
                  helper.make_node("Add", [f"{p}.h1", f"{p}.dn"], [f"{p}.h2"])]
        h = f"{p}.h2"
    nodes.append(helper.make_node("MatMul", [h, weight("head", (d, 16))], ["y"], name="head"))
    graph = helper.make_graph(nodes, "blocks", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", d])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", 16])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def _gemms(graph):
    return [g for g in weighted_gemms(graph) if not g.produces_graph_output]


def test_stages_follow_dependencies_not_names():
    graph = import_graph(residual_blocks_model(np.random.default_rng(0)))
    stages = plan_stages(graph, _gemms(graph))
    assert [sorted(s.gemms) for s in stages] == [
        ["b0.k_proj", "b0.q_proj"], ["b0.o_proj"], ["b0.up_proj"], ["b0.down_proj"],
        ["b1.k_proj", "b1.q_proj"], ["b1.o_proj"], ["b1.up_proj"], ["b1.down_proj"]]
    assert stages[0].groups == {"x": ("b0.q_proj", "b0.k_proj")}  # q and k share one Hessian


def _fake_quant(gemm, bits=3):
    w = gemm.weight.values
    return quantize_rtn(w, bits, 16, True).dequantize()


def naive_hessians(model, gemms, stages, arrays, batch):
    """Per stage: substitute the fake-quantized weights of all earlier stages into the full model,
    expose the stage's inputs as outputs, run every batch through ONNX Runtime."""
    by_key = {gemm_key(g): g for g in gemms}
    result = {}
    done = []
    for stage in stages:
        m = onnx.ModelProto.FromString(model.SerializeToString())
        replaced = {by_key[k].weight.name: _fake_quant(by_key[k]) for k in done}
        for t in m.graph.initializer:
            if t.name in replaced:
                t.CopyFrom(numpy_helper.from_array(replaced[t.name], t.name))
        names = list(stage.groups)
        m.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names if n not in ("x",))
        session = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        sums = {n: 0.0 for n in names}
        count = 0
        for feed in iterate_feeds(arrays, batch=batch)():
            values = dict(zip(names, session.run(names, feed), strict=True)) if names != ["x"] else {"x": feed["x"]}
            for n in names:
                rows = values[n].reshape(-1, values[n].shape[-1]).astype(np.float64)
                sums[n] = sums[n] + rows.T @ rows
            count += rows.shape[0]
        for n in names:
            result[n] = 2 * sums[n] / count
        done += list(stage.gemms)
    return result


def _capture(graph, gemms, arrays, batch, **options):
    by_key = {gemm_key(g): g for g in gemms}
    captured = {}

    def quantize_stage(stage, hessians):
        captured.update({name: h.numpy() for name, h in hessians.items()})
        return {key: _fake_quant(by_key[key]) for key in stage.gemms}

    report = run_sequential(graph, gemms, iterate_feeds(arrays, batch=batch), quantize_stage, device="cpu", **options)
    return captured, report


def test_hessians_match_running_the_partly_quantized_model():
    rng = np.random.default_rng(1)
    model = residual_blocks_model(rng)
    graph = import_graph(model)
    gemms = _gemms(graph)
    arrays = {"x": rng.normal(size=(10, 7, 32)).astype(np.float32)}
    expected = naive_hessians(model, gemms, plan_stages(graph, gemms), arrays, batch=4)
    peaks = {}
    for remat in (False, True):
        captured, report = _capture(graph, gemms, arrays, batch=4, rematerialize=remat)  # batches of 4, 4, 2 rows
        assert captured.keys() == expected.keys()
        for name in expected:
            np.testing.assert_allclose(captured[name], expected[name], rtol=1e-4,
                                       atol=1e-5 * np.abs(expected[name]).max())
        assert report.stages == 8 and report.batches == 3
        peaks[remat] = report.peak_cache_bytes
    # Kept between steps: a few [10, 7, 32] tensors; the 64-wide down-projection input only when it
    # is not recomputed.
    assert 0 < peaks[True] < peaks[False] <= 10 * 7 * (2 * 32 + 64) * 4


def test_graph_is_not_modified_and_feeds_must_repeat():
    rng = np.random.default_rng(2)
    model = residual_blocks_model(rng, blocks=1)
    graph = import_graph(model)
    gemms = _gemms(graph)
    before = [(n.op, [t.name for t in n.inputs]) for n in graph.nodes]
    _capture(graph, gemms, {"x": rng.normal(size=(4, 5, 32)).astype(np.float32)}, batch=2)
    assert [(n.op, [t.name for t in n.inputs]) for n in graph.nodes] == before

    calls = []

    def shrinking_feeds():
        calls.append(1)
        rows = 4 if len(calls) == 1 else 2
        return iter([{"x": rng.normal(size=(1, 5, 32)).astype(np.float32)} for _ in range(rows)])

    with pytest.raises(CalibrationDataError, match="repeatable"):
        run_sequential(graph, gemms, shrinking_feeds, lambda stage, h: {}, device="cpu")


@pytest.fixture(scope="module")
def tiny_llama():
    pytest.importorskip("transformers")
    from qcompiler.models.builders import build_llama

    return build_llama(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=96, vocab=128, seed=3)


def test_llama_export_stages_and_hessians(tiny_llama):
    """A real torch export (RoPE, causal mask, GQA, SwiGLU): per layer {q,k,v}, {o}, {gate,up}, {down}."""
    graph = import_graph(tiny_llama)
    gemms = _gemms(graph)
    stages = plan_stages(graph, gemms)
    kinds = [sorted(k.split(".")[-1].split("/")[0] for k in s.gemms) for s in stages]
    assert kinds == [["k_proj", "q_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]] * 2
    rng = np.random.default_rng(4)
    arrays = {"input_ids": rng.integers(0, 128, size=(6, 9)).astype(np.int64)}
    captured, _ = _capture(graph, gemms, arrays, batch=4)
    expected = naive_hessians(tiny_llama, gemms, stages, arrays, batch=4)
    for name in expected:
        np.testing.assert_allclose(captured[name], expected[name], rtol=1e-4, atol=1e-5 * np.abs(expected[name]).max())
