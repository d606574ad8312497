"""Graph I/O: atomic writes, external data when needed, the input never overwritten, opset raised with a reason;
standalone models of part of a graph, symbolic shapes."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import qcompiler.graph as graph_io
from qcompiler.errors import InputModelError, OutputPathError
from qcompiler.graph import import_graph, subgraph_model, symbolic_shapes
from tests.helpers import run_ort
from tests.passes.graphs import make_model, two_linear_model


def test_external_data_written_when_the_model_is_too_big(tmp_path, monkeypatch):
    model = two_linear_model(np.random.default_rng(0))
    monkeypatch.setattr(graph_io, "ONNX_PROTO_LIMIT", 1000)  # pretend the model is > 2 GB
    path = graph_io.save_model(model, tmp_path / "big.onnx")
    assert (tmp_path / "big.onnx.data").is_file()
    assert (tmp_path / "big.onnx").stat().st_size < 2000
    loaded = graph_io.load_model(path)
    feed = {"x": np.ones((3, 32), np.float32)}
    np.testing.assert_array_equal(run_ort(loaded, feed)[0], run_ort(model, feed)[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"], "no staging leftovers"


def test_small_model_single_file_and_refuses_input_path(tmp_path):
    model = two_linear_model(np.random.default_rng(1))
    path = graph_io.save_model(model, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx.data").exists()
    before = path.read_bytes()
    with pytest.raises(OutputPathError, match="input model"):
        graph_io.save_model(model, path, input_path=path)
    assert path.read_bytes() == before


def test_load_errors_are_one_line(tmp_path):
    (tmp_path / "junk.onnx").write_bytes(b"\x00\x01garbage")
    with pytest.raises(InputModelError) as err:
        graph_io.load_model(tmp_path / "junk.onnx")
    assert "\n" not in str(err.value)


def test_ensure_opset_only_raises(caplog):
    g = graph_io.import_graph(two_linear_model(np.random.default_rng(2)))
    graph_io.ensure_opset(g, 13, "test")
    assert g.opset == 18 and not caplog.records
    graph_io.ensure_opset(g, 21, "blocked QuantizeLinear")
    assert g.opset == 21 and "blocked QuantizeLinear" in caplog.text
    model = graph_io.export_graph(g)
    assert {o.domain: o.version for o in model.opset_import}[""] == 21
    onnx.checker.check_model(model)


def test_ensure_opset_rewrites_nodes_whose_signature_changed():
    """A TorchScript-style opset-17 RMSNorm: ReduceMean(axes=[-1]) takes axes as an input from opset 18,
    and Softmax over axis 1 meant "flatten to 2-D" before opset 13. Raising the opset must rewrite both
    (else the model no longer validates or computes something else) and leave the input model alone.

        x --Pow--ReduceMean(axes attr)--Add--Sqrt--Div(x, .)--> y
        x --Softmax(axis=1, opset 11 semantics)--> p
    """
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("Pow", ["x", "two"], ["sq"]),
             helper.make_node("ReduceMean", ["sq"], ["ms"], name="rms_mean", axes=[-1], keepdims=1),
             helper.make_node("Add", ["ms", "eps"], ["mse"]), helper.make_node("Sqrt", ["mse"], ["rms"]),
             helper.make_node("Div", ["x", "rms"], ["y"]), helper.make_node("Softmax", ["x"], ["p"], axis=1)]
    inits = [numpy_helper.from_array(np.array(2.0, np.float32), "two"), numpy_helper.from_array(np.array(1e-6, np.float32), "eps")]
    f32 = TensorProto.FLOAT
    for opset, outputs in ((17, ["y"]), (11, ["y", "p"])):  # Softmax's meaning changed at 13: test it from 11
        model = make_model(nodes[:4 + len(outputs)], inits, [helper.make_tensor_value_info("x", f32, [2, 3, 8])],
                           [helper.make_tensor_value_info(n, f32, [2, 3, 8]) for n in outputs], opset=opset)
        g = graph_io.import_graph(model)
        graph_io.ensure_opset(g, 21, "per-token int8 activations")
        g.cleanup().toposort()
        raised = graph_io.export_graph(g)
        onnx.checker.check_model(raised, full_check=True)
        assert {o.domain: o.version for o in model.opset_import}[""] == opset, "the input model's opset was edited"
        (mean,) = [n for n in raised.graph.node if n.op_type == "ReduceMean"]
        assert mean.name == "rms_mean" and len(mean.input) == 2 and [a.name for a in mean.attribute] == ["keepdims"]
        feed = {"x": np.random.default_rng(opset).normal(size=(2, 3, 8)).astype(np.float32)}
        for a, b in zip(run_ort(model, feed), run_ort(raised, feed), strict=True):
            np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6)


def _two_matmuls():
    """x [batch, 8] ─ MatMul(W1 [8, 300]) ─ h ─ MatMul(W2 [300, 4]) ─ y"""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n) for n, s in (("W1", (8, 300)), ("W2", (300, 4)))]
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("MatMul", ["h", "W2"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_subgraph_model_computes_an_intermediate_and_leaves_the_graph_alone():
    model = _two_matmuls()
    graph = import_graph(model)
    tensors = graph.tensors()
    sub = subgraph_model(graph, graph.nodes[:1], [tensors["x"]], [tensors["h"]])
    x = np.ones((2, 8), np.float32)
    np.testing.assert_allclose(run_ort(sub, {"x": x})[0], x @ numpy_helper.to_array(model.graph.initializer[0]), rtol=1e-5)
    assert [i.name for i in sub.graph.initializer] == ["W1"]  # only what the chosen nodes read
    assert len(graph.nodes) == 2 and tensors["h"].outputs == [graph.nodes[1]]  # the graph is not edited
    weightless = subgraph_model(graph, graph.nodes, [tensors["x"]], [tensors["y"]], weightless_above=2000)
    assert [i.name for i in weightless.graph.initializer] == ["W2"] and [i.name for i in weightless.graph.input] == ["x", "W1"]


def test_symbolic_shapes_resolve_run_time_reshapes():
    """Reshape(x, Concat(Shape(x)[0], [2], [-1])): the 2 is static although the shape is computed."""
    nodes = [helper.make_node("Shape", ["x"], ["xs"], start=0, end=1), helper.make_node("Concat", ["xs", "two", "minus1"], ["shape"], axis=0),
             helper.make_node("Reshape", ["x", "shape"], ["y"])]
    inits = [numpy_helper.from_array(np.array([v], np.int64), n) for n, v in (("two", 2), ("minus1", -1))]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    graph = import_graph(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    assert graph.tensors()["y"].shape is None
    assert symbolic_shapes(graph)["y"] == ["batch", 2, 4]
