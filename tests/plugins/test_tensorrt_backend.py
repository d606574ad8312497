"""TensorRT backend: the graph preparation runs everywhere; building an engine needs TensorRT (-m trt)."""

import numpy as np
import onnx
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


def test_prepare_runs_the_plugins_of_a_float32_graph_in_float16():
    """A float32 decoder's plugin graph: the kernels take float16 only, so Int4Gemm and FlashAttention read
    float16 (Casts, or float16 copies of scales) and their outputs are cast back; the rest stays float32."""
    from qcompiler.backends.plugin_graph import run_plugin_graph
    from qcompiler.backends.tensorrt import _element_types
    from tests.passes.graphs import decoder_model
    from tests.passes.test_plugin_graph import plugin_graph

    _, model = plugin_graph(decoder_model(np.random.default_rng(0)))
    before = model.SerializeToString()
    prepared = prepare_for_tensorrt(model)
    assert model.SerializeToString() == before  # the input is never modified
    onnx.checker.check_model(prepared)
    types = _element_types(prepared)
    plugins = [n for n in prepared.graph.node if n.domain == "qcompiler"]
    assert len(plugins) == 16
    for node in plugins:
        reads = [node.input[i] for i in ((0, 2, 4) if node.op_type == "Int4Gemm" else (0, 1, 2))]
        assert all(types[name] == TensorProto.FLOAT16 for name in reads), (node.name, [types[n] for n in reads])
    assert types["logits"] == TensorProto.FLOAT
    assert not any(t.data_type == TensorProto.FLOAT and t.name.endswith("_bias0") for t in prepared.graph.initializer)
    feeds = {"input_ids": np.random.default_rng(1).integers(0, 384, (2, 37))}
    expected = run_plugin_graph(model, feeds)[0]
    assert np.linalg.norm(run_plugin_graph(prepared, feeds)[0] - expected) / np.linalg.norm(expected) < 2e-3


def test_prepare_gives_a_key_masked_attention_its_own_plugin():
    """FlashAttention with a key_mask (the padded decoder) becomes FlashAttentionKeyMask(Q, K, V, key_mask): a
    plugin's inputs are fixed. Q/K/V read float16, the key mask int32, and the prepared graph computes the same."""
    from qcompiler.backends.plugin_graph import run_plugin_graph
    from qcompiler.backends.tensorrt import _element_types
    from tests.passes.graphs import decoder_model
    from tests.passes.test_plugin_graph import padded_feeds, plugin_graph

    _, model = plugin_graph(decoder_model(np.random.default_rng(0), padding=True))
    prepared = prepare_for_tensorrt(model)
    onnx.checker.check_model(prepared)
    types = _element_types(prepared)
    attention = [n for n in prepared.graph.node if n.domain == "qcompiler" and "Attention" in n.op_type]
    assert [n.op_type for n in attention] == ["FlashAttentionKeyMask"] * 2
    assert all(len(n.input) == 4 and types[n.input[3]] == TensorProto.INT32 for n in attention)
    assert all(types[n.input[i]] == TensorProto.FLOAT16 for n in attention for i in range(3))
    feeds = padded_feeds(3, 37, seed=1)
    tokens = feeds["attention_mask"] == 1
    expected = run_plugin_graph(model, feeds)[0][tokens]
    assert np.linalg.norm(run_plugin_graph(prepared, feeds)[0][tokens] - expected) / np.linalg.norm(expected) < 2e-3


def _attention_model(mask_inputs):
    node = helper.make_node("FlashAttention", ["q", "k", "v", *mask_inputs], ["o", "lse"], domain="qcompiler", causal=1)
    extra = [helper.make_tensor_value_info("lens", TensorProto.INT32, ["b"]),
             helper.make_tensor_value_info("keep", TensorProto.INT32, ["b", "s"])]
    g = helper.make_graph([node], "attn", [helper.make_tensor_value_info(n, TensorProto.FLOAT16, ["b", 2, "s", 16])
                                           for n in "qkv"] + [i for i in extra if i.name in mask_inputs],
                          [helper.make_tensor_value_info(n, TensorProto.UNDEFINED, None) for n in ("o", "lse")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("qcompiler", 1)])


def test_prepare_gives_a_seqlens_attention_its_own_plugin():
    from qcompiler.backends.plugin_graph import run_plugin_graph
    from qcompiler.errors import QCompileError

    model = _attention_model(["lens"])
    prepared = prepare_for_tensorrt(model)
    (node,) = prepared.graph.node
    assert node.op_type == "FlashAttentionSeqLens" and list(node.input) == ["q", "k", "v", "lens"]
    rng = np.random.default_rng(0)
    feeds = {n: rng.standard_normal((2, 2, 5, 16)).astype(np.float16) for n in "qkv"} | {"lens": np.array([5, 2], np.int32)}
    for got, want in zip(run_plugin_graph(prepared, feeds), run_plugin_graph(model, feeds), strict=True):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(QCompileError, match="exclude each other"):
        prepare_for_tensorrt(_attention_model(["lens", "keep"]))


def test_prepare_leaves_a_float16_graph_without_casts():
    prepared = prepare_for_tensorrt(_int4_model())
    assert [n.op_type for n in prepared.graph.node] == ["Int4Gemm"]


def test_prepare_keeps_a_float32_quantizer_in_float32():
    """QuantizePerToken reads float32 (a fused norm reads the float32 residual stream): no Cast, and its
    gamma/beta (fused, or the placeholders for norm="none") in X's type."""
    from qcompiler.backends.tensorrt import _element_types
    from qcompiler.config import ActivationScheme, W8A8Config
    from qcompiler.graph import export_graph, import_graph
    from qcompiler.pass_manager import PassContext
    from qcompiler.passes.fuse_quant import FuseQuant
    from qcompiler.passes.insert_qdq import InsertQDQ
    from qcompiler.passes.lower_w8a8_gemm import LowerW8A8Gemm
    from tests.passes.graphs import decoder_model

    graph = import_graph(decoder_model(np.random.default_rng(0)))
    InsertQDQ(W8A8Config(activation=ActivationScheme.PER_TOKEN_DYNAMIC)).run(graph, PassContext())
    FuseQuant(target="tensorrt").run(graph, PassContext())
    LowerW8A8Gemm().run(graph, PassContext())
    prepared = prepare_for_tensorrt(export_graph(graph))
    onnx.checker.check_model(prepared)
    types = _element_types(prepared)
    quantizers = [n for n in prepared.graph.node if n.op_type == "QuantizePerToken"]
    assert len(quantizers) == 8
    for node in quantizers:
        assert [types[name] for name in node.input] == [TensorProto.FLOAT] * 3, node.name
