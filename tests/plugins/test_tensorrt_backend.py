"""TensorRT backend: the graph preparation runs everywhere; building an engine needs TensorRT (-m trt)."""

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from qcompiler.backends.tensorrt import TensorRTUnavailableError, build_engine, prepare_for_tensorrt
from qcompiler.plugins import ops


def _int4_model():
    b, s, _ = ops.pack_int4_matmulnbits(np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32), 32)
    node = helper.make_node("Int4Gemm", ["X", "B", "S"], ["Y"], name="fc", domain="qcompiler", K=64, N=8, block_size=32,
                            bits=4)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT16, ["m", 64])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT16, ["m", 8])],
                          [numpy_helper.from_array(b, "B"), numpy_helper.from_array(s.astype(np.float16), "S")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("qcompiler", 1)])


def test_prepare_materialises_optional_inputs_on_a_copy():
    model = _int4_model()
    prepared = prepare_for_tensorrt(model)
    node = prepared.graph.node[0]
    assert len(node.input) == 5 and len(model.graph.node[0].input) == 3
    zp = numpy_helper.to_array(next(t for t in prepared.graph.initializer if t.name == node.input[3]))
    assert zp.shape == (8, 1) and (zp == 0x88).all()  # zero point 8 in both nibbles == the default


def test_build_engine_without_tensorrt_is_a_clear_error():
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed; see the trt-marked test")
    except ImportError:
        pass
    with pytest.raises(TensorRTUnavailableError, match="TensorRT"):
        build_engine(_int4_model(), "/tmp/never.engine")


@pytest.mark.trt
def test_build_int4_engine(tmp_path):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (cannot be installed on these machines)")
    path = build_engine(_int4_model(), tmp_path / "m.engine", profile={"X": ((1, 64), (16, 64), (64, 64))})
    assert path.stat().st_size > 0
