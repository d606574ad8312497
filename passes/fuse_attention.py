"""Fuses exported attention subgraphs into one attention op.

Recognised (as torch exports them for Llama, GPT-2 and BERT, RoPE already applied upstream)::

    Q ─────────────────────────────┐
    K ─[Unsqueeze─Expand─Reshape]─Transpose(0,1,3,2)─MatMul─[Mul|Div c]─[Add mask | Where(cond, ., fill)]*─Softmax(-1)─MatMul─ O
    V ─[Unsqueeze─Expand─Reshape]──────────────────────────────────────────────────────────────────────────────────────┘

with an optional scalar Mul on Q (or on K^T) folded into the scale. The bracketed GQA repeat of K/V
(``repeat_kv``) is stripped for the plugin target, whose kernel indexes kv head ``h // (Hq/Hkv)``.

Targets:
  * ``"plugin"``: one ``qcompiler::FlashAttention(Q, K, V) -> (O, LSE)`` node, with ``scale`` and
    ``causal``. The kernel takes no arbitrary additive mask, so the pass fires only without a mask or
    when the mask is a compile-time constant equal to the causal mask (checked numerically: every kept
    position is kept, every dropped one is dropped or pushed below -1e4); any other mask is declined.
  * ``"onnxruntime"``: ``com.microsoft.MultiHeadAttention`` (CPU, float32) on [B, S, H*D] views of
    Q/K/V (Transpose+Reshape, the GQA repeat kept; K/V whose single head the MatMuls broadcast over
    Q's heads, multi-query attention without a repeat as Falcon exports it, are expanded to Q's heads
    first, since MultiHeadAttention takes as many K/V heads as Q heads), every mask turned into its additive
    ``attention_bias``: ``Add(m)`` contributes m and ``Where(c, s, f)`` contributes ``Where(c, 0, f)``,
    because ``softmax(where(c, s, f)) = softmax(s + where(c, 0, f))`` whenever f is a large negative
    number (f + s rounds to f, exactly as f does) and exactly when f is -inf. The result is the
    unfused graph's function up to float rounding.

A candidate that does not match says why in ``PassResult.not_fired``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from qcompiler.graph import add_domain, constant_value
from qcompiler.pass_manager import PassContext, PassResult
from qcompiler.plugins.ops import DOMAIN, FLASH_ATTENTION

__all__ = ["FuseAttention", "AttentionMatch"]

logger = logging.getLogger(__name__)

TARGETS = ("plugin", "onnxruntime")


@dataclass
class AttentionMatch:
    """What one attention subgraph is made of (tensors of the graph)."""

    q: gs.Tensor
    k: gs.Tensor  # before the K^T transpose, GQA repeat included
    v: gs.Tensor
    k_raw: gs.Tensor  # GQA repeat stripped (== k without one)
    v_raw: gs.Tensor
    scale: float
    masks: list[tuple[str, gs.Node]]  # ("add", node) / ("where", node), innermost first
    softmax: gs.Node
    out: gs.Tensor
    nodes: list[gs.Node]
    scores: gs.Tensor  # QK^T, [B, H, S, T]
    k_bshd: gs.Tensor | None = None  # set when K^T came as Transpose([B, S, H, D], perm=[0,2,3,1])


def _scalar(t: gs.Tensor) -> float | None:
    v = constant_value(t)
    if v is None or v.size != 1:
        return None
    return float(np.asarray(v).reshape(-1)[0])


def _dim(t: gs.Tensor, axis: int) -> int | None:
    """Static size of ``t``'s 4-D shape along ``axis``, else None."""
    if t.shape is None or len(t.shape) != 4 or not isinstance(t.shape[axis], int):
        return None
    return t.shape[axis]


def _producer(t: gs.Tensor, op: str) -> gs.Node | None:
    if len(t.inputs) == 1 and t.inputs[0].op == op:
        return t.inputs[0]
    return None


def _strip_repeat_kv(t: gs.Tensor) -> tuple[gs.Tensor, list[gs.Node]]:
    """Reshape(Expand(Unsqueeze(x, 2))) -> x (HF repeat_kv); anything else -> t itself."""
    reshape = _producer(t, "Reshape")
    expand = reshape and _producer(reshape.inputs[0], "Expand")
    unsq = expand and _producer(expand.inputs[0], "Unsqueeze")
    if not unsq:
        return t, []
    axes = unsq.attrs.get("axes")
    if axes is None and len(unsq.inputs) > 1:
        axes = constant_value(unsq.inputs[1])
    if axes is None or list(np.asarray(axes).reshape(-1)) != [2]:
        return t, []
    return unsq.inputs[0], [reshape, expand, unsq]


class FuseAttention:
    """Replaces attention subgraphs with one fused op.

    Args:
        target: "plugin" (qcompiler::FlashAttention for the TensorRT backend) or "onnxruntime"
            (com.microsoft.MultiHeadAttention, runnable and checkable on ONNX Runtime's CPU provider).
    """

    name = "fuse_attention"

    def __init__(self, target: str = "plugin"):
        if target not in TARGETS:
            raise ValueError(f"FuseAttention: target must be one of {TARGETS}, got {target!r}")
        self.target = target

    # ------------------------------------------------------------------------------------------ match
    def match(self, softmax: gs.Node) -> AttentionMatch | str:
        """The attention subgraph ending at ``softmax``, or the reason it is not one."""
        axis = softmax.attrs.get("axis", -1)
        x = softmax.inputs[0]
        if axis != -1 and not (x.shape is not None and axis == len(x.shape) - 1):
            return f"Softmax axis {axis} is not the last axis"
        out_t = softmax.outputs[0]
        if len(out_t.outputs) != 1 or out_t.outputs[0].op != "MatMul" or out_t.outputs[0].inputs[0] is not out_t:
            return (f"Softmax output does not feed exactly one MatMul as its left operand "
                    f"(it feeds {[n.op for n in out_t.outputs]})")
        pv = out_t.outputs[0]
        nodes = [softmax, pv]
        masks: list[tuple[str, gs.Node]] = []
        t = x
        scale = 1.0
        qk = None
        for _ in range(6):  # a few masks and scales, in any order
            if len(t.inputs) != 1:
                return f"tensor {t.name} has no producer on the score path"
            node = t.inputs[0]
            if len(t.outputs) != 1:
                return f"intermediate {t.name} has other consumers"
            if node.op == "MatMul":
                qk = node
                break
            if node.op in ("Mul", "Div"):
                c = _scalar(node.inputs[1]) if _scalar(node.inputs[1]) is not None else None
                other = node.inputs[0]
                if c is None and node.op == "Mul" and _scalar(node.inputs[0]) is not None:
                    c, other = _scalar(node.inputs[0]), node.inputs[1]
                if c is None or c == 0:
                    return f"{node.op} {node.name} on the score path is not by a constant scalar"
                scale = scale * c if node.op == "Mul" else scale / c
                nodes.append(node)
                t = other
            elif node.op == "Add":
                a, b = node.inputs
                if a.inputs and a.inputs[0].op in ("MatMul", "Mul", "Div", "Where", "Add") and self._leads_to_qk(a):
                    t = a
                elif self._leads_to_qk(b):
                    t = b
                else:
                    return f"Add {node.name} does not sit on a QK^T path"
                masks.append(("add", node))
                nodes.append(node)
            elif node.op == "Where":
                masks.append(("where", node))
                nodes.append(node)
                t = node.inputs[1]
            else:
                return f"{node.op} {node.name} between QK^T and Softmax is not a scale or a mask"
        if qk is None:
            return "no QK^T MatMul found within the score path"
        nodes.append(qk)
        q, kt = qk.inputs
        for side in ("q", "k"):  # scalar Mul on either operand (scale split between q and k)
            tt = q if side == "q" else kt
            mul = _producer(tt, "Mul")
            if mul is not None and len(tt.outputs) == 1:
                c = _scalar(mul.inputs[1])
                if c is not None:
                    scale *= c
                    nodes.append(mul)
                    if side == "q":
                        q = mul.inputs[0]
                    else:
                        kt = mul.inputs[0]
        tr = _producer(kt, "Transpose")
        perm = list(tr.attrs.get("perm", [])) if tr is not None else []
        k_bshd = None
        if perm == [0, 1, 3, 2]:  # K^T of K [B, H, T, D]
            k = tr.inputs[0]
        elif perm == [0, 2, 3, 1]:  # K^T straight from the [B, T, H, D] view (BERT, GPT-2 exports)
            k_bshd = tr.inputs[0]
            k = gs.Variable(f"{kt.name}_k_bhsd", dtype=kt.dtype)  # made by a Transpose at rewrite time
        else:
            return "the right operand of QK^T is not Transpose(K, perm=[0,1,3,2]) nor Transpose(K_bshd, perm=[0,2,3,1])"
        nodes.append(tr)
        v = pv.inputs[1]
        for name, tensor in (("Q", q), ("K", k), ("V", v)):
            if tensor.shape is not None and len(tensor.shape) != 4:
                return f"{name} has rank {len(tensor.shape)}, expected [B, H, S, D]"
        k_raw, k_rep = _strip_repeat_kv(k)
        v_raw, v_rep = _strip_repeat_kv(v)
        if bool(k_rep) != bool(v_rep):
            return "only one of K and V goes through the GQA repeat"
        return AttentionMatch(q, k, v, k_raw, v_raw, scale, masks[::-1], softmax, pv.outputs[0], nodes, qk.outputs[0],
                              k_bshd)

    @staticmethod
    def _leads_to_qk(t: gs.Tensor) -> bool:
        for _ in range(6):
            if len(t.inputs) != 1:
                return False
            node = t.inputs[0]
            if node.op == "MatMul":
                return True
            if node.op in ("Mul", "Div"):
                t = node.inputs[0] if _scalar(node.inputs[1]) is not None else node.inputs[1]
            elif node.op == "Where":
                t = node.inputs[1]
            elif node.op == "Add":
                return FuseAttention._leads_to_qk(node.inputs[0]) or FuseAttention._leads_to_qk(node.inputs[1])
            else:
                return False
        return False

    # ------------------------------------------------------------------------------------------- run
    def run(self, graph: gs.Graph, context: PassContext) -> PassResult:
        fused, not_fired = [], []
        for softmax in [n for n in graph.nodes if n.op == "Softmax"]:
            m = self.match(softmax)
            if isinstance(m, str):
                not_fired.append((softmax.name, m))
                continue
            if context.is_excluded(softmax.name):
                not_fired.append((softmax.name, "excluded by the user"))
                continue
            reason = self._rewrite_plugin(graph, m) if self.target == "plugin" else self._rewrite_ort(graph, m)
            if reason:
                not_fired.append((softmax.name, reason))
                continue
            fused.append({"softmax": softmax.name, "scale": m.scale, "masks": [k for k, _ in m.masks],
                          "gqa": m.k_raw is not m.k})
        if fused:
            graph.cleanup().toposort()
        what = f"{DOMAIN}::{FLASH_ATTENTION}" if self.target == "plugin" else "com.microsoft.MultiHeadAttention"
        return PassResult(bool(fused), f"fused {len(fused)} attention subgraphs into {what}", fused, not_fired)

    def _detach(self, graph: gs.Graph, m: AttentionMatch) -> gs.Tensor:
        if m.k_bshd is not None:
            graph.nodes.append(gs.Node("Transpose", attrs={"perm": [0, 2, 1, 3]}, inputs=[m.k_bshd], outputs=[m.k]))
        out = m.out
        out.inputs.clear()
        return out

    def _rewrite_plugin(self, graph: gs.Graph, m: AttentionMatch) -> str:
        causal = 0
        if m.masks:
            causal_ok = self._constant_causal(m)
            if causal_ok is not True:
                return causal_ok or "mask is not a constant causal mask"
            causal = 1
        out = self._detach(graph, m)
        lse = gs.Variable(f"{out.name}_lse", dtype=np.float32)
        node = gs.Node(op=FLASH_ATTENTION, name=f"{m.softmax.name}_flash" if m.softmax.name else "", domain=DOMAIN,
                       attrs={"causal": causal, "scale": float(m.scale)}, inputs=[m.q, m.k_raw, m.v_raw],
                       outputs=[out, lse])
        graph.nodes.append(node)
        add_domain(graph, DOMAIN)
        return ""

    @staticmethod
    def _constant_causal(m: AttentionMatch) -> bool | str:
        """True if the (constant) masks are exactly a top-left causal mask over [S, S]."""
        keep = None
        for kind, node in m.masks:
            if kind == "add":
                mask = constant_value(node.inputs[1]) if constant_value(node.inputs[0]) is None else constant_value(node.inputs[0])
                if mask is None:
                    return "additive mask is computed at run time (the plugin target takes only a constant causal mask)"
                mask = np.asarray(mask, np.float64)
                if not np.all((mask == 0) | (mask <= -1e4)):
                    return "additive mask holds values other than 0 and large negatives"
                k = mask == 0
            else:
                cond = constant_value(node.inputs[0])
                fill = _scalar(node.inputs[2])
                if cond is None or fill is None:
                    return "Where mask condition is computed at run time (the plugin target takes only a constant causal mask)"
                if fill > -1e4:
                    return f"Where fill value {fill} is not a large negative"
                k = np.asarray(cond, bool)
            keep = k if keep is None else (keep & k)
        keep2 = keep.reshape(keep.shape[-2:]) if keep.size == keep.shape[-1] * keep.shape[-2] else None
        if keep2 is None or keep2.shape[0] != keep2.shape[1]:
            return "constant mask varies over batch or heads, or is not square"
        if not np.array_equal(keep2, np.tril(np.ones_like(keep2, dtype=bool))):
            return "constant mask is not the causal (lower-triangular) mask"
        return True

    def _rewrite_ort(self, graph: gs.Graph, m: AttentionMatch) -> str:
        heads = m.q.shape[1] if m.q.shape is not None and isinstance(m.q.shape[1], int) else None
        if heads is None:
            return "number of heads (dim 1 of Q) is not static"
        name = m.softmax.name or m.out.name

        def to_bsh(t: gs.Tensor, tag: str) -> gs.Tensor:
            tr = gs.Variable(f"{name}_{tag}_bshd", dtype=t.dtype)
            r = gs.Variable(f"{name}_{tag}_bsh", dtype=t.dtype)
            graph.nodes.append(gs.Node("Transpose", attrs={"perm": [0, 2, 1, 3]}, inputs=[t], outputs=[tr]))
            shape = gs.Constant(f"{name}_{tag}_shape", np.array([0, 0, -1], np.int64))
            graph.nodes.append(gs.Node("Reshape", inputs=[tr, shape], outputs=[r]))
            return r

        bias = None
        for kind, node in m.masks:
            if kind == "add":
                on_path = 0 if self._leads_to_qk(node.inputs[0]) else 1
                term = node.inputs[1 - on_path]
            else:
                term = gs.Variable(f"{name}_where_bias_{len(graph.nodes)}", dtype=np.float32)
                zero = gs.Constant(f"{name}_zero_{len(graph.nodes)}", np.zeros((), np.float32))
                graph.nodes.append(gs.Node("Where", inputs=[node.inputs[0], zero, node.inputs[2]], outputs=[term]))
            if bias is None:
                bias = term
            else:
                total = gs.Variable(f"{name}_bias_sum_{len(graph.nodes)}", dtype=np.float32)
                graph.nodes.append(gs.Node("Add", inputs=[bias, term], outputs=[total]))
                bias = total
        if bias is not None:
            # MultiHeadAttention wants attention_bias [B|1, H|1, S, T] with S and T spelled out, while
            # exported masks broadcast over S ([B, 1, 1, T]): expand to the score shape.
            # [B, H, S] from Q and T from K (not Shape(QK^T), which would keep the unfused MatMul alive)
            bhs = gs.Variable(f"{name}_bhs", dtype=np.int64)
            t_len = gs.Variable(f"{name}_t", dtype=np.int64)
            shape = gs.Variable(f"{name}_scores_shape", dtype=np.int64)
            full = gs.Variable(f"{name}_bias_full", dtype=np.float32)
            graph.nodes.append(gs.Node("Shape", attrs={"start": 0, "end": 3}, inputs=[m.q], outputs=[bhs]))
            graph.nodes.append(gs.Node("Shape", attrs={"start": 2, "end": 3}, inputs=[m.k], outputs=[t_len]))
            graph.nodes.append(gs.Node("Concat", attrs={"axis": 0}, inputs=[bhs, t_len], outputs=[shape]))
            graph.nodes.append(gs.Node("Expand", inputs=[bias, shape], outputs=[full]))
            bias = full
        def all_heads(t: gs.Tensor, known: int | None, tag: str) -> gs.Tensor:
            # MatMul broadcasts K/V with one head over Q's heads (multi-query attention without a
            # repeat, e.g. Falcon); MultiHeadAttention wants as many K/V heads as Q has: Expand them.
            if known == heads:
                return t
            full = gs.Variable(f"{name}_{tag}_all_heads", dtype=t.dtype)
            shape = gs.Constant(f"{name}_{tag}_heads_shape", np.array([1, heads, 1, 1], np.int64))
            graph.nodes.append(gs.Node("Expand", inputs=[t, shape], outputs=[full]))
            return full

        k_heads = _dim(m.k_bshd, 2) if m.k_bshd is not None else _dim(m.k, 1)
        k = all_heads(m.k, k_heads, "k")
        v = all_heads(m.v, _dim(m.v, 1), "v")
        q3, k3, v3 = to_bsh(m.q, "q"), to_bsh(k, "k"), to_bsh(v, "v")
        empty = gs.Variable.empty()
        inputs = [q3, k3, v3] + ([empty, empty, bias] if bias is not None else [])
        o3 = gs.Variable(f"{name}_mha_out", dtype=m.out.dtype)
        graph.nodes.append(gs.Node("MultiHeadAttention", domain="com.microsoft", name=f"{name}_mha",
                                   attrs={"num_heads": int(heads), "scale": float(m.scale)}, inputs=inputs, outputs=[o3]))
        o4 = gs.Variable(f"{name}_mha_bshd", dtype=m.out.dtype)
        shape = gs.Constant(f"{name}_o_shape", np.array([0, 0, heads, -1], np.int64))
        graph.nodes.append(gs.Node("Reshape", inputs=[o3, shape], outputs=[o4]))
        out = self._detach(graph, m)
        graph.nodes.append(gs.Node("Transpose", attrs={"perm": [0, 2, 1, 3]}, inputs=[o4], outputs=[out]))
        add_domain(graph, "com.microsoft")
        return ""
