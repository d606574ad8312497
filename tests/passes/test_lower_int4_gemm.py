"""LowerInt4Gemm: MatMulNBits -> qcompiler::Int4Gemm.

    X ──MatMulNBits(B, scales[, zp][, bias])──> Y      becomes      X ──Int4Gemm(B, scales[, zp][, bias])──> Y

The rewritten op has no ONNX Runtime kernel, so numerics are checked by evaluating the documented
Int4Gemm semantics (ops.unpack_int4_matmulnbits) in numpy against ORT running the original node.
"""

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qcompiler.graph import export_graph, import_graph
from qcompiler.pass_manager import PassContext
from qcompiler.passes.lower_int4_gemm import LowerInt4Gemm
from qcompiler.plugins import ops


def _model(K=96, N=16, block=32, sym=True, bias=False, bits=4, dynamic_weight=False):
    rng = np.random.default_rng(0)
    b, s, z = ops.pack_int4_matmulnbits(rng.standard_normal((N, K)).astype(np.float32), block, symmetric=sym)
    inits = [numpy_helper.from_array(s, "S")]
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["m", K])]
    if dynamic_weight:
        inputs.append(helper.make_tensor_value_info("B", TensorProto.UINT8, list(b.shape)))
    else:
        inits.append(numpy_helper.from_array(b, "B"))
    names = ["X", "B", "S", ""]
    if z is not None:
        inits.append(numpy_helper.from_array(z, "Z"))
        names[3] = "Z"
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(N).astype(np.float32), "bias"))
        names += ["", "bias"]
    while names[-1] == "":
        names.pop()
    node = helper.make_node("MatMulNBits", names, ["Y"], name="fc1", domain="com.microsoft", K=K, N=N, bits=bits,
                            block_size=block)
    g = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["m", N])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 9
    return m, (b, s, z)


@pytest.mark.parametrize("sym,bias", [(True, False), (False, True)])
def test_lowers_and_keeps_semantics(sym, bias):
    model, (b, s, z) = _model(sym=sym, bias=bias)
    graph = import_graph(model)
    result = LowerInt4Gemm().run(graph, PassContext())
    assert result.changed and len(result.details) == 1
    out = export_graph(graph)
    (node,) = out.graph.node
    assert (node.op_type, node.domain) == ("Int4Gemm", "qcompiler")
    assert any(o.domain == "qcompiler" for o in out.opset_import)
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs == {"K": 96, "N": 16, "block_size": 32, "bits": 4}
    assert list(node.input)[:3] == ["X", "B", "S"]
    assert (len(node.input) > 3 and node.input[3] == "Z") == (not sym)
    assert (len(node.input) == 5 and node.input[4] == "bias") == bias
    # Int4Gemm semantics (numpy) == ORT's MatMulNBits on the original model
    x = np.random.default_rng(1).standard_normal((5, 96)).astype(np.float32)
    y_ort = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"X": x})[0]
    inits = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    w = ops.unpack_int4_matmulnbits(inits["B"], inits["S"], inits.get("Z"), 96)
    y = x @ w.T + (inits["bias"] if bias else 0)
    np.testing.assert_allclose(y, y_ort, rtol=1e-4, atol=1e-4)
    # the model handed in is untouched
    assert model.graph.node[0].op_type == "MatMulNBits"


def test_declines_dynamic_weight_and_other_bits():
    for kwargs, why in (({"dynamic_weight": True}, "not constant"), ({"bits": 8}, "bits=8")):
        model, _ = _model(**kwargs)
        graph = import_graph(model)
        result = LowerInt4Gemm().run(graph, PassContext())
        assert not result.changed
        assert result.not_fired and why in result.not_fired[0][1]
        assert export_graph(graph).graph.node[0].op_type == "MatMulNBits"
