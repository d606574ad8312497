"""FuseAttention on tiny exported-style attention graphs.

    Q ─────────────────────────────────────────┐
    K ─[repeat_kv]─Transpose(0,1,3,2)─────── MatMul ─ Div/Mul ─ [Add mask | Where(cond)] ─ Softmax ─ MatMul ─ O
    V ─[repeat_kv]───────────────────────────────────────────────────────────────────────────────┘

onnxruntime target: the fused graph runs in ORT (com.microsoft.MultiHeadAttention) and must equal the
unfused one (fp32, ~1e-5). plugin target: qcompiler::FlashAttention's documented semantics (a numpy reference run by ONNX's
reference evaluator) must equal ORT's output of the unfused graph; a mask computed at run time is fused
only when it reads shapes and at most a [batch, sequence] padding input, and keeps the causal (or the
full) triangle and the padding's keys at every length and padding pattern checked.
"""

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qcompiler.backends.plugin_graph import run_plugin_graph
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
        shape = [d.dim_value or {"batch": B, "seq": S}[d.dim_param] for d in i.type.tensor_type.shape.dim]
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
    np.testing.assert_allclose(run_plugin_graph(fused, feeds)[0], _run(model, feeds), rtol=1e-5, atol=1e-5)


def test_plugin_target_declines_a_mask_read_from_an_input():
    graph = import_graph(_graph("bert"))
    result = FuseAttention("plugin").run(graph, PassContext())
    assert not result.changed
    assert result.not_fired == [("attn_softmax", result.not_fired[0][1])]
    assert "values of graph input mask" in result.not_fired[0][1]


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
    unchanged. For the plugin, the decoders' causal masks (computed at run time from the input's shape)
    and BERT's padding mask (read from attention_mask: a key_mask input, not causal) fuse and the outputs
    are unchanged under the op's reference, with a right- and a left-padded row."""
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
            mask[0, :2] = 0
            mask[1, -3:] = 0
            feeds[i.name] = mask
        else:
            feeds[i.name] = rng.integers(0, 200, (2, 11)).astype(np.int64)
    reference = _run(model, feeds)
    np.testing.assert_allclose(_run(fused, feeds), reference, rtol=1e-5, atol=1e-5)
    graph = import_graph(model)
    plugin = FuseAttention("plugin", max_seq_len=1024).run(graph, PassContext())
    assert len(plugin.details) == n_softmax and all(d["masks"] for d in plugin.details), plugin.not_fired
    fused = export_graph(graph)
    assert not any(n.op_type == "Softmax" for n in fused.graph.node)
    flash = [n for n in fused.graph.node if n.op_type == "FlashAttention"]
    padded = builder == "build_bert"
    assert all((len(n.input) == 5) == padded and helper.get_attribute_value(n.attribute[0]) == (not padded)
               for n in flash)  # key_mask; causal
    np.testing.assert_allclose(run_plugin_graph(fused, feeds)[0], reference, rtol=1e-4, atol=1e-4 * np.abs(reference).max())


def _runtime_mask_graph(*, window=None, upper=False, padding=False, casts=False):
    """Attention whose mask is computed at run time from Q's shape, as exports build it (dims symbolic)::

        q ─ Shape ─ Gather(2) ─ Range ─┬ Unsqueeze(1) = i ─┐
                                       └ Unsqueeze(0) = j ─ i >= j [& i - j < window] [& keep[b, j]] ─ Where(., scores, fill)

    ``upper`` keeps j >= i instead (not causal); ``padding`` ands in a mask read from the bool input
    ``keep`` [batch, seq] (a run-time value): "keys" keep[b, j] (key padding), "queries" keep[b, i] (not
    one), "two" keep[b, j] & keep2[b, j] (two inputs); ``casts`` adds the Cast(float) before and after
    Softmax that TorchScript exports of ``softmax(x, dtype=float32).to(dtype)`` carry.
    """
    f32 = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info(n, f32, ["batch", HQ, "seq", D]) for n in ("q", "k", "v")]
    inits = [numpy_helper.from_array(np.array(v, dt), n) for n, v, dt in
             [("two", 2, np.int64), ("zero", 0, np.int64), ("one", 1, np.int64), ("ax0", [0], np.int64),
              ("ax1", [1], np.int64), ("axes01", [1, 2], np.int64), ("axes13", [1, 3], np.int64), ("isd", 1 / np.sqrt(D), np.float32),
              ("fill", np.finfo(np.float32).min, np.float32), ("window", window or 0, np.int64)]]
    nodes = [helper.make_node("Shape", ["q"], ["qshape"]), helper.make_node("Gather", ["qshape", "two"], ["seq"]),
             helper.make_node("Range", ["zero", "seq", "one"], ["pos"]),
             helper.make_node("Unsqueeze", ["pos", "ax1"], ["i"]), helper.make_node("Unsqueeze", ["pos", "ax0"], ["j"]),
             helper.make_node("GreaterOrEqual", ["j", "i"] if upper else ["i", "j"], ["cond0"])]
    cond = "cond0"
    if window:
        nodes += [helper.make_node("Sub", ["i", "j"], ["dist"]), helper.make_node("Less", ["dist", "window"], ["near"]),
                  helper.make_node("And", [cond, "near"], ["cond1"])]
        cond = "cond1"
    if padding:
        inputs.append(helper.make_tensor_value_info("keep", TensorProto.BOOL, ["batch", "seq"]))
        keep = "keep"
        if padding == "two":
            inputs.append(helper.make_tensor_value_info("keep2", TensorProto.BOOL, ["batch", "seq"]))
            nodes.append(helper.make_node("And", ["keep", "keep2"], ["keep_both"]))
            keep = "keep_both"
        nodes += [helper.make_node("Unsqueeze", [keep, "axes13" if padding == "queries" else "axes01"], ["keep4"]),
                  helper.make_node("And", [cond, "keep4"], ["cond2"])]
        cond = "cond2"
    nodes += [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]), helper.make_node("MatMul", ["q", "kt"], ["qk"]),
              helper.make_node("Mul", ["qk", "isd"], ["s0"]), helper.make_node("Where", [cond, "s0", "fill"], ["s1"])]
    scores, probs = "s1", "p"
    if casts:
        nodes.append(helper.make_node("Cast", ["s1"], ["s1f"], to=f32))
        scores, probs = "s1f", "p0"
    nodes.append(helper.make_node("Softmax", [scores], [probs], axis=-1, name="attn_softmax"))
    if casts:
        nodes.append(helper.make_node("Cast", ["p0"], ["p"], to=f32))
    nodes.append(helper.make_node("MatMul", ["p", "v"], ["o"]))
    g = helper.make_graph(nodes, "attn", inputs, [helper.make_tensor_value_info("o", f32, ["batch", HQ, "seq", D])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    return m


@pytest.mark.parametrize("casts", [False, True])
def test_plugin_target_fuses_a_causal_mask_computed_from_shapes(casts):
    model = _runtime_mask_graph(casts=casts)
    graph = import_graph(model)
    result = FuseAttention("plugin", max_seq_len=300).run(graph, PassContext())
    assert result.changed, result.not_fired
    fused = export_graph(graph)
    assert [n.op_type for n in fused.graph.node] == ["FlashAttention"]  # the mask's computation is gone too
    assert helper.get_attribute_value(fused.graph.node[0].attribute[0]) == 1  # causal
    feeds = _feeds(model)
    np.testing.assert_allclose(run_plugin_graph(fused, feeds)[0], _run(model, feeds), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mask,max_seq_len,why", [
    (dict(window=4), 300, "not the causal"),  # a sliding window is caught at lengths past it
    (dict(window=200), 300, "not the causal"),  # ... also when only the longest length checked is past it
    (dict(window=500), 300, "constant 500, beyond max_seq_len=300"),  # wider than any length checked
    (dict(upper=True), 300, "not the causal"),
    (dict(padding="queries"), 300, "not the causal (lower-triangular) mask and the padding"),
    (dict(padding="two"), 300, "values of graph inputs ['keep', 'keep2']"),
    (dict(padding="keys", window=4), 300, "not the causal (lower-triangular) mask and the padding"),
])
def test_plugin_target_declines_other_run_time_masks(mask, max_seq_len, why):
    graph = import_graph(_runtime_mask_graph(**mask))
    result = FuseAttention("plugin", max_seq_len=max_seq_len).run(graph, PassContext())
    assert not result.changed
    assert why in result.not_fired[0][1], result.not_fired


@pytest.mark.parametrize("causal", [True, False])
def test_plugin_target_fuses_a_key_padding_mask(causal):
    """A mask read from a padding input: FlashAttention gets key_mask = Cast(keep, int32) and is exact at
    every row that sees a key; a row that sees none (a left-padded position before the first kept key)
    gets O = 0, where the unfused graph averages V over its masked keys."""
    model = _runtime_mask_graph(padding="keys", upper=not causal)
    if not causal:  # keep every (i, j): i >= j | j >= i, so only the padding masks
        for node in model.graph.node:
            if node.op_type == "GreaterOrEqual":
                node.op_type = "Equal"
        model.graph.node.insert(0, helper.make_node("Constant", [], ["all"], value=numpy_helper.from_array(np.array(True))))
        for node in model.graph.node:
            if node.op_type == "And" and node.input[1] == "keep4":
                node.input[0] = "all"
    graph = import_graph(model)
    result = FuseAttention("plugin", max_seq_len=300).run(graph, PassContext())
    assert result.changed, result.not_fired
    fused = export_graph(graph)
    (flash,) = [n for n in fused.graph.node if n.op_type == "FlashAttention"]
    assert helper.get_attribute_value(flash.attribute[0]) == int(causal)
    assert flash.input[3] == "" and [n.op_type for n in fused.graph.node if n.output[0] == flash.input[4]] == ["Cast"]
    feeds = _feeds(model)
    keep = np.ones((B, S), bool)
    keep[0, :3] = False  # left padding: with the causal mask, rows 0-2 see no key
    keep[1, [2, 5]] = False  # holes
    feeds["keep"] = keep
    got, want = run_plugin_graph(fused, feeds)[0], _run(model, feeds)
    sees_a_key = (np.tril(np.ones((S, S), bool)) if causal else np.ones((S, S), bool))[None] & keep[:, None, :]
    rows = np.broadcast_to(sees_a_key.any(-1)[:, None, :], got.shape[:3])
    assert (~rows).sum() == (3 * HQ if causal else 0)
    np.testing.assert_allclose(got[rows], want[rows], rtol=1e-5, atol=1e-5)
    assert np.all(got[~rows] == 0)


def test_a_window_wider_than_max_seq_len_is_exactly_causal_up_to_it():
    # Up to max_seq_len the window never bites: the fused op is exact for every sequence the model is meant for.
    result = FuseAttention("plugin", max_seq_len=500).run(import_graph(_runtime_mask_graph(window=500)), PassContext())
    assert result.changed, result.not_fired


def test_onnxruntime_target_with_casts_around_softmax():
    model = _runtime_mask_graph(casts=True)
    graph = import_graph(model)
    result = FuseAttention("onnxruntime").run(graph, PassContext())
    assert result.changed, result.not_fired
    fused = export_graph(graph)
    assert not any(n.op_type in ("Softmax", "Cast") for n in fused.graph.node)
    feeds = _feeds(model)
    np.testing.assert_allclose(_run(fused, feeds), _run(model, feeds), rtol=1e-5, atol=1e-5)


def test_onnxruntime_target_finds_heads_reshaped_at_run_time():
    """TorchScript exports split heads with a shape computed at run time, so Q's head count is not in
    its type; symbolic shape inference recovers it::

        x [batch, seq, H*D] ─ Reshape(x, Concat(Shape(x)[0], Shape(x)[1], H, D)) ─ Transpose(0,2,1,3) ─ q/k/v
    """
    f32 = TensorProto.FLOAT
    nodes = [helper.make_node("Shape", ["x"], ["xs"]),
             helper.make_node("Gather", ["xs", "i0"], ["b"]), helper.make_node("Gather", ["xs", "i1"], ["s"]),
             helper.make_node("Concat", ["b", "s", "h", "d"], ["shape"], axis=0)]
    for t in ("q", "k", "v"):
        nodes += [helper.make_node("Reshape", ["x", "shape"], [f"{t}4"]),
                  helper.make_node("Transpose", [f"{t}4"], [t], perm=[0, 2, 1, 3])]
    nodes += [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]), helper.make_node("MatMul", ["q", "kt"], ["qk"]),
              helper.make_node("Div", ["qk", "sd"], ["sc"]), helper.make_node("Softmax", ["sc"], ["p"], axis=-1),
              helper.make_node("MatMul", ["p", "v"], ["o"])]
    inits = [numpy_helper.from_array(np.array([v], np.int64), n) for n, v in (("i0", 0), ("i1", 1), ("h", HQ), ("d", D))]
    inits += [numpy_helper.from_array(np.array(np.sqrt(D), np.float32), "sd")]
    g = helper.make_graph(nodes, "heads", [helper.make_tensor_value_info("x", f32, ["batch", "seq", HQ * D])],
                          [helper.make_tensor_value_info("o", f32, None)], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    graph = import_graph(model)
    assert graph.tensors()["q"].shape is None
    result = FuseAttention("onnxruntime").run(graph, PassContext())
    assert result.changed, result.not_fired
    fused = export_graph(graph)
    (mha,) = [n for n in fused.graph.node if n.op_type == "MultiHeadAttention"]
    assert helper.get_attribute_value(mha.attribute[0]) == HQ
    feeds = {"x": np.random.default_rng(0).standard_normal((B, S, HQ * D)).astype(np.float32)}
    np.testing.assert_allclose(_run(fused, feeds), _run(model, feeds), rtol=1e-5, atol=1e-5)


def _cached_attention_graph(*, aligned="bottom-right", padding=False, fill=None, nan_guard=False):
    """One decode/prefill step of attention over a KV cache, as exports with ``past_key_values`` build it::

        past_k [batch, H, past, D] ─┐
        k      [batch, H, seq, D]  ─ Concat(axis 2) ─ Transpose ─ MatMul(q, .) ─ Mul ─ Where(i >= j [& keep[b, j]], ., fill) ─┐
        Softmax ─ [Where(IsNaN(p), 0, p)] ─ MatMul(., Concat(past_v, v)) ─ o ──────────────────────────────────────────────────┘

    Query i sits at position past + i of the past + seq keys ("bottom-right"); ``aligned="top-left"``
    puts it at i, a mask that forgets the cache. ``padding`` ands in ``keep`` [batch, past + seq] (bool).
    ``fill`` defaults to the lowest float32, as transformers fills masks.
    ``nan_guard`` adds what torch's scaled_dot_product_attention export puts after its Softmax.
    """
    f32 = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info(n, f32, ["batch", HQ, "seq", D]) for n in ("q", "k", "v")]
    inputs += [helper.make_tensor_value_info(n, f32, ["batch", HQ, "past", D]) for n in ("past_k", "past_v")]
    inits = [numpy_helper.from_array(np.array(v, dt), n) for n, v, dt in
             [("two", 2, np.int64), ("zero", 0, np.int64), ("one", 1, np.int64), ("ax0", [0], np.int64),
              ("ax1", [1], np.int64), ("axes01", [1, 2], np.int64), ("isd", 1 / np.sqrt(D), np.float32),
              ("fill", np.finfo(np.float32).min if fill is None else fill, np.float32), ("zero_f", 0.0, np.float32)]]
    first_query = "past" if aligned == "bottom-right" else "zero"
    nodes = [helper.make_node("Shape", ["q"], ["qshape"]), helper.make_node("Gather", ["qshape", "two"], ["seq"]),
             helper.make_node("Shape", ["past_k"], ["pshape"]), helper.make_node("Gather", ["pshape", "two"], ["past"]),
             helper.make_node("Add", ["past", "seq"], ["total"]), helper.make_node("Add", [first_query, "seq"], ["last_query"]),
             helper.make_node("Range", [first_query, "last_query", "one"], ["qpos"]),
             helper.make_node("Range", ["zero", "total", "one"], ["kpos"]),
             helper.make_node("Unsqueeze", ["qpos", "ax1"], ["i"]), helper.make_node("Unsqueeze", ["kpos", "ax0"], ["j"]),
             helper.make_node("GreaterOrEqual", ["i", "j"], ["cond0"])]
    cond = "cond0"
    if padding:
        inputs.append(helper.make_tensor_value_info("keep", TensorProto.BOOL, ["batch", "past + seq"]))
        nodes += [helper.make_node("Unsqueeze", ["keep", "axes01"], ["keep4"]), helper.make_node("And", [cond, "keep4"], ["cond1"])]
        cond = "cond1"
    nodes += [helper.make_node("Concat", ["past_k", "k"], ["k_all"], axis=2), helper.make_node("Concat", ["past_v", "v"], ["v_all"], axis=2),
              helper.make_node("Transpose", ["k_all"], ["kt"], perm=[0, 1, 3, 2]), helper.make_node("MatMul", ["q", "kt"], ["qk"]),
              helper.make_node("Mul", ["qk", "isd"], ["s0"]), helper.make_node("Where", [cond, "s0", "fill"], ["s1"]),
              helper.make_node("Softmax", ["s1"], ["p0"], axis=-1, name="attn_softmax")]
    probs = "p0"
    if nan_guard:
        nodes += [helper.make_node("IsNaN", ["p0"], ["nan"]), helper.make_node("Where", ["nan", "zero_f", "p0"], ["p"])]
        probs = "p"
    nodes.append(helper.make_node("MatMul", [probs, "v_all"], ["o"]))
    g = helper.make_graph(nodes, "cached_attn", inputs, [helper.make_tensor_value_info("o", f32, ["batch", HQ, "seq", D])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    return m


# (new tokens, cached tokens): a prefill, a one-token decode step, a chunk after a cache
STEPS = [(9, 0), (1, 9), (4, 6)]


def _cached_feeds(seq, past, seed=0):
    """Q/K/V of ``seq`` new tokens, a cache of ``past``, and keep: row 0 left-padded (its first 3 positions),
    row 1 with a hole at position 2."""
    rng = np.random.default_rng(seed)
    feeds = {n: rng.standard_normal((B, HQ, seq, D)).astype(np.float32) for n in ("q", "k", "v")}
    feeds |= {n: rng.standard_normal((B, HQ, past, D)).astype(np.float32) for n in ("past_k", "past_v")}
    keep = np.ones((B, past + seq), bool)
    keep[0, :3] = False
    keep[1, 2] = False
    return feeds | {"keep": keep}


def _rows_that_see_a_key(feeds):
    """[B, 1, seq] bool: query rows whose causal window holds a kept key."""
    keep, seq = feeds["keep"], feeds["q"].shape[2]
    total = keep.shape[1]
    return (np.tri(seq, total, total - seq, dtype=bool)[None] & keep[:, None, :]).any(-1)[:, None, :]


@pytest.mark.parametrize("padding", [False, True])
def test_plugin_target_fuses_attention_over_a_kv_cache(padding):
    """The query rows are the last of the keys (causal bottom-right aligned, as the op defines it), checked at
    prefills, decode steps and chunks: one node over the concatenated cache, exact at every step."""
    model = _cached_attention_graph(padding=padding)
    graph = import_graph(model)
    result = FuseAttention("plugin", max_seq_len=300).run(graph, PassContext())
    assert result.changed, result.not_fired
    assert result.details[0]["causal"] and result.details[0]["key_mask"] == ("keep" if padding else None)
    fused = export_graph(graph)
    (flash,) = [n for n in fused.graph.node if n.op_type == "FlashAttention"]
    assert list(flash.input[1:3]) == ["k_all", "v_all"]
    for seq, past in STEPS:
        feeds = _cached_feeds(seq, past)
        got, want = run_plugin_graph(fused, feeds)[0], _run(model, feeds)
        rows = np.broadcast_to(_rows_that_see_a_key(feeds) if padding else True, got.shape[:3])
        np.testing.assert_allclose(got[rows], want[rows], rtol=1e-5, atol=1e-5)
        assert np.all(got[~rows] == 0)


def test_plugin_target_declines_a_mask_that_forgets_the_cache():
    """A causal mask aligned top-left (query i at position i, not past + i) equals the op's only when nothing is cached."""
    result = FuseAttention("plugin", max_seq_len=300).run(import_graph(_cached_attention_graph(aligned="top-left")), PassContext())
    assert not result.changed
    assert "new tokens after" in result.not_fired[0][1], result.not_fired


@pytest.mark.parametrize("target", ["plugin", "onnxruntime"])
def test_nan_guard_of_scaled_dot_product_attention_exports(target):
    """Where(IsNaN(P), 0, P) after the Softmax (a row masked with -inf everywhere gives NaN, zeroed): the
    plugin's O = 0 on such rows is what the guard gives, so it is exact on every row; MultiHeadAttention
    gets a finite bias instead of -inf (NaN there would spread through the cache to every row) and is exact
    on every row that sees a key."""
    model = _cached_attention_graph(padding=True, fill=-np.inf, nan_guard=True)
    graph = import_graph(model)
    result = FuseAttention(target, max_seq_len=300).run(graph, PassContext())
    assert result.changed, result.not_fired
    fused = export_graph(graph)
    assert not {"IsNaN", "Softmax"} & {n.op_type for n in fused.graph.node}
    for seq, past in STEPS:
        feeds = _cached_feeds(seq, past)
        want = _run(model, feeds)
        got = run_plugin_graph(fused, feeds)[0] if target == "plugin" else _run(fused, feeds)
        assert np.all(np.isfinite(got))
        rows = np.broadcast_to(_rows_that_see_a_key(feeds), got.shape[:3])
        if target == "plugin":
            rows = np.ones_like(rows)
        np.testing.assert_allclose(got[rows], want[rows], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("args,message", [(("tensorrt",), "target must be one of"), (("plugin", 0), "max_seq_len must be")])
def test_bad_configuration_is_a_clear_error(args, message):
    with pytest.raises(ValueError, match=message):
        FuseAttention(*args)
