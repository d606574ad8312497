"""Tiny graphs built in code, shared by the pass tests."""

import numpy as np
from onnx import TensorProto, helper, numpy_helper


def make_model(nodes, inits, inputs, outputs, opset=18, domains=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    imports = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in domains]
    return helper.make_model(graph, opset_imports=imports, ir_version=10)


def two_linear_model(rng, k=32, n=48, t=12, outlier=0.0):
    """x -> Relu -> {MatMul W1, Gemm(transB) W2 + b} -> Tanh;  also a tiny MatMul (N=4) that must stay float.

        x --Relu--> h --+--> MatMul(W1 [K,N])            --Tanh--> y1
                        +--> Gemm(W2 [N,K], transB=1, b)  --Tanh--> y2
                        +--> MatMul(Wt [K,4])            --Tanh--> y3   (tiny: skipped)
    (Tanh keeps the GEMMs from producing graph outputs, which the LM-head rule would skip.)
    """
    w1 = rng.normal(size=(k, n)).astype(np.float32)
    w2 = rng.normal(size=(n, k)).astype(np.float32)
    nodes = [helper.make_node("Relu", ["x"], ["h"], name="relu"),
             helper.make_node("MatMul", ["h", "w1"], ["m1"], name="fc1"),
             helper.make_node("Gemm", ["h", "w2", "b2"], ["m2"], name="fc2", transB=1),
             helper.make_node("MatMul", ["h", "wt"], ["m3"], name="tiny")]
    nodes += [helper.make_node("Tanh", [f"m{i}"], [f"y{i}"]) for i in (1, 2, 3)]
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"),
             numpy_helper.from_array(rng.normal(size=n).astype(np.float32), "b2"),
             numpy_helper.from_array(rng.normal(size=(k, 4)).astype(np.float32), "wt")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", k])]
    outputs = [helper.make_tensor_value_info("y1", TensorProto.FLOAT, ["rows", n]),
               helper.make_tensor_value_info("y2", TensorProto.FLOAT, ["rows", n]),
               helper.make_tensor_value_info("y3", TensorProto.FLOAT, ["rows", 4])]
    return make_model(nodes, inits, inputs, outputs)


def decoder_model(rng, *, vocab=384, hidden=256, heads=4, kv_heads=2, ffn=512, layers=2, padding=False, cache=False):
    """A Llama-style decoder written out as exports write it (no torch needed), ``input_ids -> logits``::

        ids ─ Gather(embed) ─ x ─┬─ RMSNorm ─ q/k/v MatMul ─ Reshape ─ Transpose ─ [K/V: repeat_kv]
                                 │     QK^T ─ Mul(1/sqrt(D)) ─ Add(mask) ─ Softmax ─ PV ─ Transpose ─ Reshape ─ o MatMul ─ + ─┐
                                 └─────────────────────────────────────────────────────────────────────────────────────────┘
                                 then RMSNorm ─ gate/up MatMul ─ SiLU(gate) * up ─ down MatMul ─ +; final RMSNorm ─ LM head

    The causal mask is computed at run time from the input's shape (Shape ─ Range ─ GreaterOrEqual ─
    Where(0, min)); repeat_kv expands K/V to the query heads with shapes read at run time. With
    ``padding`` the model also takes ``attention_mask`` int64 [batch, seq] and the mask keeps only the
    keys it marks (causal & Cast(attention_mask, bool)[:, None, None, :]), as padded-batch exports do.
    With ``cache`` (padding implied) it is one step over a KV cache, laid out as optimum exports decoders
    with past: ``past_key_values.{layer}.key/value`` [batch, kv_heads, past_seq, head_dim] inputs are
    concatenated before the new tokens' K/V (``present.{layer}.key/value`` outputs), attention_mask is
    [batch, past_seq + seq] and query i sits at position past_seq + i of the causal mask.
    """
    padding = padding or cache
    head_dim = hidden // heads
    f32 = np.float32
    inits, nodes = [], []

    def const(name, value, dtype=np.int64):  # shared by the layers: written once
        if all(i.name != name for i in inits):
            inits.append(numpy_helper.from_array(np.asarray(value, dtype), name))
        return name

    def weight(name, shape, scale):
        inits.append(numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(f32), name))
        return name

    def node(op, inputs, output, **attrs):
        nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    def rms_norm(x, tag):
        gain = weight(f"{tag}.gain", [hidden], 0.1)
        inits[-1] = numpy_helper.from_array(1 + numpy_helper.to_array(inits[-1]), gain)
        mean = node("ReduceMean", [node("Mul", [x, x], f"{tag}/sq"), const("axis_last", [-1])], f"{tag}/mean", keepdims=1)
        rms = node("Sqrt", [node("Add", [mean, const("eps", 1e-6, f32)], f"{tag}/var")], f"{tag}/rms")
        return node("Mul", [node("Div", [x, rms], f"{tag}/normed"), gain], f"{tag}/out")

    x = node("Gather", [weight("embed", [vocab, hidden], 1.0), "input_ids"], "embedding", axis=0)
    ids_shape = node("Shape", ["input_ids"], "ids_shape")
    batch = node("Gather", [ids_shape, const("i0", [0])], "batch")
    seq = node("Gather", [ids_shape, const("i1", [1])], "seq")
    seq_scalar = node("Squeeze", [seq, const("axis0", [0])], "seq_scalar")
    total, past = seq, const("zero", 0)
    if cache:
        past = node("Squeeze", [node("Gather", [node("Shape", ["past_key_values.0.key"], "past_shape"), const("i2", [2])],
                                     "past_seq"), "axis0"], "past_scalar")
        total = node("Unsqueeze", [node("Add", [past, seq_scalar], "total_scalar"), "axis0"], "total")
    keys = node("Range", [const("zero", 0), node("Squeeze", [total, "axis0"], "total_keys"), const("one", 1)], "pos")
    queries = node("Range", [past, node("Add", [past, seq_scalar], "last_query"), "one"], "query_pos") if cache else keys
    causal = node("GreaterOrEqual", [node("Unsqueeze", [queries, const("axis1", [1])], "pos_i"),
                                     node("Unsqueeze", [keys, "axis0"], "pos_j")], "causal")
    if padding:
        keys = node("Unsqueeze", [node("Cast", ["attention_mask"], "mask_bool", to=TensorProto.BOOL), const("axes12", [1, 2])],
                    "mask_keys")
        causal = node("And", [causal, keys], "causal_and_padding")
    mask = node("Where", [causal, const("zero_f", 0.0, f32), const("min_f", np.finfo(f32).min, f32)], "mask")
    kv_shape = node("Concat", [batch, const("kv_heads", [kv_heads]), const("rep", [heads // kv_heads]), total,
                               const("head_dim", [head_dim])], "kv_expand_shape", axis=0)
    for layer in range(layers):
        p = f"layers.{layer}"
        n = rms_norm(x, f"{p}.attn_norm")
        split = {}
        for name, width in (("q", heads), ("k", kv_heads), ("v", kv_heads)):
            proj = node("MatMul", [n, weight(f"{p}.{name}_proj", [hidden, width * head_dim], hidden ** -0.5)], f"{p}/{name}_proj")
            heads4 = node("Reshape", [proj, const(f"{name}_view", [0, 0, width, head_dim])], f"{p}/{name}_view")
            split[name] = node("Transpose", [heads4], f"{p}/{name}_bhsd", perm=[0, 2, 1, 3])
            if cache and name != "q":
                past_name = f"past_key_values.{layer}.{'key' if name == 'k' else 'value'}"
                split[name] = node("Concat", [past_name, split[name]], past_name.replace("past_key_values", "present"), axis=2)
        for name in ("k", "v"):
            expanded = node("Expand", [node("Unsqueeze", [split[name], const("axis2", [2])], f"{p}/{name}_unsq"), kv_shape],
                            f"{p}/{name}_expand")
            split[name] = node("Reshape", [expanded, const("heads_view", [0, heads, -1, head_dim])], f"{p}/{name}_rep")
        kt = node("Transpose", [split["k"]], f"{p}/kt", perm=[0, 1, 3, 2])
        scores = node("Mul", [node("MatMul", [split["q"], kt], f"{p}/qk"), const("inv_sqrt_d", head_dim ** -0.5, f32)],
                      f"{p}/scaled")
        probs = node("Softmax", [node("Add", [scores, mask], f"{p}/masked")], f"{p}/softmax", axis=-1)
        attn = node("Transpose", [node("MatMul", [probs, split["v"]], f"{p}/pv")], f"{p}/attn_bshd", perm=[0, 2, 1, 3])
        attn = node("Reshape", [attn, const("merge_heads", [0, 0, hidden])], f"{p}/attn")
        x = node("Add", [x, node("MatMul", [attn, weight(f"{p}.o_proj", [hidden, hidden], hidden ** -0.5)], f"{p}/o_proj")],
                 f"{p}/resid1")
        n = rms_norm(x, f"{p}.mlp_norm")
        gate = node("MatMul", [n, weight(f"{p}.gate_proj", [hidden, ffn], hidden ** -0.5)], f"{p}/gate_proj")
        up = node("MatMul", [n, weight(f"{p}.up_proj", [hidden, ffn], hidden ** -0.5)], f"{p}/up_proj")
        act = node("Mul", [node("Mul", [gate, node("Sigmoid", [gate], f"{p}/sigmoid")], f"{p}/silu"), up], f"{p}/act")
        x = node("Add", [x, node("MatMul", [act, weight(f"{p}.down_proj", [ffn, hidden], ffn ** -0.5)], f"{p}/down_proj")],
                 f"{p}/resid2")
    logits = node("MatMul", [rms_norm(x, "final_norm"), weight("lm_head", [hidden, vocab], hidden ** -0.5)], "logits")
    nodes[-1].output[0] = "logits"
    inputs = [helper.make_tensor_value_info(name, TensorProto.INT64, ["batch", "seq"])
              for name in ("input_ids", "attention_mask")[:1 + padding]]
    outputs = [helper.make_tensor_value_info(logits, TensorProto.FLOAT, ["batch", "seq", vocab])]
    if cache:
        inputs[1] = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "past_seq + seq"])
        for layer in range(layers):
            for kv in ("key", "value"):
                inputs.append(helper.make_tensor_value_info(f"past_key_values.{layer}.{kv}", TensorProto.FLOAT,
                                                            ["batch", kv_heads, "past_seq", head_dim]))
                outputs.append(helper.make_tensor_value_info(f"present.{layer}.{kv}", TensorProto.FLOAT,
                                                             ["batch", kv_heads, "past_seq + seq", head_dim]))
    return make_model(nodes, inits, inputs, outputs, opset=21)
