"""FuseAttention on tiny exported-style attention graphs.

    Q ─────────────────────────────────────────┐
    K ─[repeat_kv]─Transpose(0,1,3,2)─────── MatMul ─ Div/Mul ─ [Add mask | Where(cond)] ─ Softmax ─ MatMul ─ O
    V ─[repeat_kv]───────────────────────────────────────────────────────────────────────────────┘

onnxruntime target: the fused graph runs in ORT (com.microsoft.MultiHeadAttention) and must equal the
unfused one (fp32, ~1e-5). plugin target: qcompiler::FlashAttention's documented semantics (torch
reference on CPU) must equal ORT's output of the unfused graph; runtime masks are declined.
"""

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qcompiler.graph import export_graph, import_graph
from qcompiler.pass_manager import PassContext
from qcompiler.passes.fuse_attention import FuseAttention

B, HQ, S, D = 2, 4, 7, 8


def _graph(kind, hkv=HQ, const_causal=False, repeat_kv=True):
    """kind: 'bert' (Div + Add mask input), 'gpt2' (Mul + Where causal + Add mask), 'llama' (GQA, Mul, Where).

    With ``repeat_kv=False`` fewer K/V heads reach the MatMuls as they are (one head broadcast over
    Q's heads: Falcon's multi-query attention).
    """
    nodes, inits = [], []
    f32 = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info("q", f32, [B, HQ, S, D]),
              helper.make_tensor_value_info("k", f32, [B, hkv, S, D]),
              helper.make_tensor_value_info("v", f32, [B, hkv, S, D])]
    k, v = "k", "v"
    if hkv != HQ and repeat_kv:  # HF repeat_kv
        rep = HQ // hkv
        inits += [numpy_helper.from_array(np.array([2], np.int64), "ax2"),
                  numpy_helper.from_array(np.array([B, hkv, rep, S, D], np.int64), "eshape"),
                  numpy_helper.from_array(np.array([B, HQ, S, D], np.int64), "rshape")]
        for t in ("k", "v"):
            nodes += [helper.make_node("Unsqueeze", [t, "ax2"], [f"{t}_u"]),
                      helper.make_node("Expand", [f"{t}_u", "eshape"], [f"{t}_e"]),
                      helper.make_node("Reshape", [f"{t}_e", "rshape"], [f"{t}_r"])]
        k, v = "k_r", "v_r"
    nodes += [helper.make_node("Transpose", [k], ["kt"], perm=[0, 1, 3, 2]),
              helper.make_node("MatMul", ["q", "kt"], ["qk"])]
    if kind == "bert":
        inits.append(numpy_helper.from_array(np.array(np.sqrt(D), np.float32), "sd"))
        nodes += [helper.make_node("Div", ["qk", "sd"], ["s0"]), helper.make_node("Add", ["s0", "mask"], ["s"])]
        inputs.append(helper.make_tensor_value_info("mask", f32, [B, 1, 1, S]))
    else:
        inits.append(numpy_helper.from_array(np.array(1 / np.sqrt(D), np.float32), "isd"))
        inits.append(numpy_helper.from_array(np.array(np.finfo(np.float32).min, np.float32), "fill"))
        nodes.append(helper.make_node("Mul", ["qk", "isd"], ["s0"]))
        if const_causal:
            inits.append(numpy_helper.from_array(np.tril(np.ones((S, S), bool))[None, None], "cond"))
        else:
            inputs.append(helper.make_tensor_value_info("cond", TensorProto.BOOL, [1, 1, S, S]))
        nodes.append(helper.make_node("Where", ["cond", "s0", "fill"], ["s1" if kind == "gpt2" else "s"]))
        if kind == "gpt2":
            inputs.append(helper.make_tensor_value_info("mask", f32, [B, 1, 1, S]))
            nodes.append(helper.make_node("Add", ["s1", "mask"], ["s"]))
    nodes += [helper.make_node("Softmax", ["s"], ["p"], axis=-1, name="attn_softmax"),
              helper.make_node("MatMul", ["p", v], ["o"])]
    g = helper.make_graph(nodes, "attn", inputs, [helper.make_tensor_value_info("o", f32, [B, HQ, S, D])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    return m


def _feeds(model, seed=0):
    rng = np.random.default_rng(seed)
    feeds = {}
    for i in model.graph.input:
        shape = [d.dim_value for d in i.type.tensor_type.shape.dim]
        if i.name == "mask":
            keep = rng.random(shape) > 0.3
            keep[..., 0] = True
            feeds[i.name] = np.where(keep, 0.0, -10000.0).astype(np.float32)
        elif i.name == "cond":
            feeds[i.name] = np.tril(np.ones((S, S), bool))[None, None]
        else:
            feeds[i.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def _run(model, feeds):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    return sess.run(None, {k: v for k, v in feeds.items() if k in names})[0]


@pytest.mark.parametrize("kind,hkv", [("bert", HQ), ("gpt2", HQ), ("llama", 2), ("llama", 1)])
def test_onnxruntime_target_is_exact(kind, hkv):
    model = _graph(kind, hkv)
    graph = import_graph(model)
    result = FuseAttention("onnxruntime").run(graph, PassContext())
    assert result.changed, result.not_fired
    fused = export_graph(graph)
    ops = [n.op_type for n in fused.graph.node]
    assert "Softmax" not in ops and ops.count("MultiHeadAttention") == 1
    assert ops.count("MatMul") == 0  # QK^T and PV are gone, not merely bypassed
    feeds = _feeds(model)
    np.testing.assert_allclose(_run(fused, feeds), _run(model, feeds), rtol=1e-5, atol=1e-5)
    assert any(n.op_type == "Softmax" for n in model.graph.node)  # input model untouched


def test_onnxruntime_target_expands_a_broadcast_kv_head():
    # MatMul broadcasts one K/V head over the 4 query heads; MultiHeadAttention needs them spelled out.
    model = _graph("llama", 1, repeat_kv=False)
    graph = import_graph(model)
    result = FuseAttention("onnxruntime").run(graph, PassContext())
    assert result.changed, result.not_fired
    fused = export_graph(graph)
    assert [n.op_type for n in fused.graph.node].count("Expand") >= 2  # K and V (the mask bias has its own)
    feeds = _feeds(model)
    np.testing.assert_allclose(_run(fused, feeds), _run(model, feeds), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("hkv", [HQ, 2])
def test_plugin_target_causal_constant_mask(hkv):
    torch = pytest.importorskip("torch")
    pytest.importorskip("triton", reason="the reference lives beside the Triton kernel")
    from qcompiler.plugins.flash_attention import flash_attention_reference

    model = _graph("llama", hkv, const_causal=True)
    graph = import_graph(model)
    result = FuseAttention("plugin").run(graph, PassContext())
    assert result.changed, result.not_fired
    fused = export_graph(graph)
    (node,) = [n for n in fused.graph.node if n.op_type == "FlashAttention"]
    assert node.domain == "qcompiler" and list(node.input) == ["q", "k", "v"]  # GQA repeat stripped
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["causal"] == 1 and abs(attrs["scale"] - 1 / np.sqrt(D)) < 1e-7
    assert len(fused.graph.node) == 1
    feeds = _feeds(model)
    o, _ = flash_attention_reference(*(torch.from_numpy(feeds[n]) for n in ("q", "k", "v")), causal=True,
                                     scale=attrs["scale"])
    np.testing.assert_allclose(o.numpy(), _run(model, feeds), rtol=1e-5, atol=1e-5)


def test_plugin_target_declines_runtime_mask():
    graph = import_graph(_graph("bert"))
    result = FuseAttention("plugin").run(graph, PassContext())
    assert not result.changed
    assert result.not_fired == [("attn_softmax", result.not_fired[0][1])]
    assert "run time" in result.not_fired[0][1]


def test_not_attention_softmax_is_left_alone():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5])
    g = helper.make_graph([helper.make_node("Softmax", ["x"], ["y"], axis=-1, name="cls")], "g", [x],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5])])
    graph = import_graph(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    result = FuseAttention("onnxruntime").run(graph, PassContext())
    assert not result.changed and "MatMul" in result.not_fired[0][1]


@pytest.mark.parametrize("builder", ["build_llama", "build_gpt2", "build_bert"])
def test_exported_models(builder):
    """Models torch exports (models/builders.py): every layer fuses for ONNX Runtime and the logits are
    unchanged; the plugin target declines their run-time masks with a reason."""
    pytest.importorskip("torch")
    builders = pytest.importorskip("qcompiler.models.builders")
    model = getattr(builders, builder)()
    n_softmax = sum(n.op_type == "Softmax" for n in model.graph.node)
    graph = import_graph(model)
    result = FuseAttention("onnxruntime").run(graph, PassContext())
    assert len(result.details) == n_softmax > 0, result.not_fired
    fused = export_graph(graph)
    assert not any(n.op_type == "Softmax" for n in fused.graph.node)
    rng = np.random.default_rng(0)
    feeds = {}
    for i in model.graph.input:
        if "mask" in i.name:
            mask = np.ones((2, 11), np.int64)
            mask[1, -3:] = 0
            feeds[i.name] = mask
        else:
            feeds[i.name] = rng.integers(0, 200, (2, 11)).astype(np.int64)
    np.testing.assert_allclose(_run(fused, feeds), _run(model, feeds), rtol=1e-5, atol=1e-5)
    declined = FuseAttention("plugin").run(import_graph(model), PassContext())
    assert not declined.changed and len(declined.not_fired) == n_softmax
