"""Graph I/O: atomic writes, external data when needed, the input never overwritten, opset raised with a reason."""

import numpy as np
import onnx
import pytest

import qcompiler.graph as graph_io
from qcompiler.errors import InputModelError, OutputPathError
from tests.helpers import run_ort
from tests.passes.graphs import two_linear_model


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
