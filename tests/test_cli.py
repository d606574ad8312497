"""The CLI: bad input gets one line on stderr and a non-zero exit, and nothing is overwritten."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from qcompiler.cli import main
from tests.passes.graphs import make_model, two_linear_model


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save(two_linear_model(np.random.default_rng(0)), str(path))
    return path


@pytest.fixture
def calib_path(tmp_path):
    path = tmp_path / "calib.npz"
    np.savez(path, x=np.random.default_rng(1).normal(size=(16, 32)).astype(np.float32))
    return path


def _fails(capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    assert exit_info.value.code != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert message in err, err
    return err


def test_compiles_and_reports(tmp_path, model_path, calib_path, capsys):
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    main([str(model_path), "-o", str(out), "--recipe", "w8a8-naive", "--calib", str(calib_path),
          "--shapes", "x:8x32", "--report", str(report), "-q"])
    assert out.is_file() and report.is_file()
    assert any(n.op_type == "MatMulIntegerToFloat" for n in onnx.load(str(out)).graph.node)
    assert '"speedup"' in report.read_text()


def test_list_recipes(capsys):
    main(["--list-recipes"])
    assert "w8a8-smoothquant" in capsys.readouterr().out


def test_not_an_onnx_file(tmp_path, capsys):
    bogus = tmp_path / "model.onnx"
    bogus.write_text("this is not a model")
    _fails(capsys, [bogus, "-o", tmp_path / "out.onnx", "--recipe", "w8a8-smoothquant"], "not a readable ONNX model")


def test_missing_model(tmp_path, capsys):
    _fails(capsys, [tmp_path / "absent.onnx", "-o", tmp_path / "out.onnx"], "not found")


@pytest.mark.parametrize("arrays, message", [
    ({"y": np.zeros((4, 32), np.float32)}, "keyed by the model's input names"),
    ({"x": np.zeros((4, 31), np.float32)}, "model expects"),
    ({"x": np.zeros((4, 32), np.int64)}, "dtype"),
    ({"x": np.full((4, 32), np.nan, np.float32)}, "NaN"),
])
def test_bad_calibration_arrays(tmp_path, model_path, capsys, arrays, message):
    calib = tmp_path / "bad.npz"
    np.savez(calib, **arrays)
    out = tmp_path / "out.onnx"
    out.write_bytes(b"previous result")
    _fails(capsys, [model_path, "-o", out, "--recipe", "w8a8-naive", "--calib", calib], message)
    assert out.read_bytes() == b"previous result", "a failed run must not touch an existing output"


def test_nothing_quantizable(tmp_path, capsys, calib_path):
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", 32])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", 32])])
    path = tmp_path / "relu.onnx"
    onnx.save(model, str(path))
    _fails(capsys, [path, "-o", tmp_path / "out.onnx", "--recipe", "w8a8-naive", "--calib", calib_path],
           "found nothing to quantize")
    assert not (tmp_path / "out.onnx").exists()


def test_output_equal_to_input_is_refused(model_path, calib_path, capsys):
    before = model_path.read_bytes()
    _fails(capsys, [model_path, "-o", model_path, "--calib", calib_path], "is the input model")
    assert model_path.read_bytes() == before


@pytest.mark.parametrize("where", ["missing_folder", "is_a_folder", "proc"])
def test_unwritable_output(tmp_path, model_path, calib_path, capsys, where):
    target = {"missing_folder": tmp_path / "no" / "such" / "out.onnx", "is_a_folder": tmp_path,
              "proc": "/proc/qcompile-out.onnx"}[where]
    _fails(capsys, [model_path, "-o", target, "--recipe", "w8a8-naive", "--calib", calib_path, "--no-eval"],
           "cannot write" if where != "is_a_folder" else "")
    assert not list(tmp_path.glob(".*.onnx.*")), "no staging leftovers"


def test_unknown_recipe_and_bad_yaml(tmp_path, model_path, capsys):
    _fails(capsys, [model_path, "-o", tmp_path / "o.onnx", "--recipe", "w9a9"], "unknown recipe")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nsmoothquant: {alpha: 3}\n")
    _fails(capsys, [model_path, "-o", tmp_path / "o.onnx", "--recipe", bad], "alpha must be in [0, 1]")


def test_recipe_needs_calibration(tmp_path, model_path, capsys):
    _fails(capsys, [model_path, "-o", tmp_path / "o.onnx", "--recipe", "w8a8-naive"], "needs calibration data")


def test_plugins_only_for_the_tensorrt_backend(tmp_path, model_path, capsys):
    _fails(capsys, [model_path, "-o", tmp_path / "o.onnx", "--recipe", "w4a16-rtn", "--plugins"], "--backend tensorrt")
    assert not (tmp_path / "o.onnx").exists()


def test_plugins_end_the_graph_in_plugin_ops_and_evaluate_it(tmp_path, capsys):
    """A decoder to Int4Gemm + FlashAttention; its outputs are compared through the ops' numpy
    references (ONNX Runtime cannot run them) and no latency is claimed."""
    from tests.passes.graphs import decoder_model

    source, out = tmp_path / "decoder.onnx", tmp_path / "decoder.plugins.onnx"
    onnx.save(decoder_model(np.random.default_rng(0)), str(source))
    before = source.read_bytes()
    main([str(source), "-o", str(out), "--recipe", "w4a16-rtn", "--backend", "tensorrt", "--plugins", "--max-seq-len", "256",
          "--shapes", "input_ids:2x37"])
    report = capsys.readouterr().out
    ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    assert ops.count("Int4Gemm") == 14 and ops.count("FlashAttention") == 2 and "MatMulNBits" not in ops
    sqnr = float(next(line for line in report.splitlines() if line.startswith("| logits |")).split("|")[3])
    assert sqnr > 10.0, report  # INT4 g128 RTN of random weights: 15.0 dB measured
    assert "Latency not measured" in report and "latency ms" not in report
    assert source.read_bytes() == before


def test_plugins_for_a_padded_encoder(tmp_path, capsys):
    """BERT reads attention_mask: its attention fuses with a key_mask, and the compiled graph (through the ops'
    references, with ONNX's GatherElements replaced: the evaluator's own fails on BERT's [1, 512] buffer)
    keeps its function on padded calibration samples."""
    pytest.importorskip("torch")
    from qcompiler.models.builders import build_bert

    source, calib, out = tmp_path / "bert.onnx", tmp_path / "calib.npz", tmp_path / "bert.plugins.onnx"
    build_bert(path=source)
    rng = np.random.default_rng(0)
    mask = np.ones((8, 32), np.int64)
    mask[::2, -9:] = 0
    np.savez(calib, input_ids=rng.integers(0, 256, (8, 32)), attention_mask=mask)
    main([str(source), "-o", str(out), "--recipe", "w8a8-smoothquant", "--backend", "tensorrt", "--plugins",
          "--max-seq-len", "512", "--calib", str(calib)])
    report = capsys.readouterr().out
    flash = [n for n in onnx.load(str(out)).graph.node if n.op_type == "FlashAttention"]
    assert len(flash) == 2 and all(n.input[4] == "attention_mask_key_mask_int32" for n in flash)
    assert "fused 2 attention subgraphs into qcompiler::FlashAttention (2 with key_mask from attention_mask)" in report
    sqnr = float(next(line for line in report.splitlines() if line.startswith("| last_hidden_state |")).split("|")[3])
    assert sqnr > 25.0, report  # 36.8 dB measured
