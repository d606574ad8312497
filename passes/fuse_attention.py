"""Fuses exported attention subgraphs into one attention op.

Recognised (as torch exports them for Llama, GPT-2 and BERT, with the dynamo or the TorchScript
exporter; RoPE already applied upstream)::

    Q ─────────────────────────────┐
    K ─[Unsqueeze─Expand─Reshape]─Transpose(0,1,3,2)─MatMul─[Mul|Div c]─[Add mask | Where(cond, ., fill) | Cast f32]*─Softmax─[Cast]─MatMul─ O
    V ─[Unsqueeze─Expand─Reshape]──────────────────────────────────────────────────────────────────────────────────────────────────┘

with an optional scalar Mul on Q (or on K^T) folded into the scale, and after the Softmax optionally the
``Where(IsNaN(P), 0, P)`` that torch's scaled_dot_product_attention export adds (a row its mask leaves
without a key gives 0, as the fused op does). The bracketed GQA repeat of K/V
(``repeat_kv``) is stripped for the plugin target, whose kernel indexes kv head ``h // (Hq/Hkv)``. A
Cast to float32 before Softmax and one to a float type after it (``softmax(x, dtype=float32).to(v.dtype)``)
are what the fused kernels do inside: float32 softmax, probabilities in V's type.

Targets:
  * ``"plugin"``: one ``qcompiler::FlashAttention(Q, K, V[, key_mask]) -> (O, LSE)`` node, with ``scale``
    and ``causal``. The kernel takes no arbitrary additive mask, so the pass fires only without a mask
    or when the mask is causal, a key padding mask, or both: a compile-time constant checked as it is
    (causal only), or a mask computed at run time from shapes and at most one input's values, a
    [batch, sequence] padding input (``attention_mask``), computed with ONNX Runtime at lengths up to
    ``max_seq_len`` and checked at each against ``causal(i, j) and pad[b, j] != 0``, for padding
    patterns of 0/1 values: none, left, right and random holes. With a KV cache (K and V are
    ``Concat(past, new)`` of a graph input ``past`` [batch, heads, past, head_dim]) the queries are the
    last of the keys: causal(i, j) is j <= i + past, checked at prefills, one-token decode steps and
    chunks after a cache; the padding input then covers past and new tokens. Checked means every kept position is
    kept and every dropped one is dropped or pushed below -1e4. The padding input reaches the node as
    ``key_mask = Cast(pad, int32)``. Exact at every query row that sees a key; a row that sees none
    (a left-padded position before the first token, or a batch entry with no token) gets O = 0 where
    the unfused graph averages over masked keys: both are values of padding positions, which no other
    position reads (their keys are masked). Declined with the reason: masks that read other inputs'
    values, or two inputs', or that differ from that form at some length (sliding windows) or pattern.
  * ``"onnxruntime"``: ``com.microsoft.MultiHeadAttention`` (CPU, float32) on [B, S, H*D] views of
    Q/K/V (Transpose+Reshape, the GQA repeat kept; K/V whose single head the MatMuls broadcast over
    Q's heads, multi-query attention without a repeat as Falcon exports it, are expanded to Q's heads
    first, since MultiHeadAttention takes as many K/V heads as Q heads), every mask turned into its additive
    ``attention_bias``: ``Add(m)`` contributes m and ``Where(c, s, f)`` contributes ``Where(c, 0, f)``,
    because ``softmax(where(c, s, f)) = softmax(s + where(c, 0, f))`` whenever f is a large negative
    number (f + s rounds to f, exactly as f does) and exactly when f is -inf. The head count comes from
    Q's type, or (TorchScript exports reshape by sizes computed at run time) from ONNX Runtime's symbolic
    shape inference. The result is the unfused graph's function up to float rounding, except, behind a
    NaN guard, on rows that see no key: the bias is kept finite (a -inf row would give NaN), so they
    average V where the guard gives 0.

A candidate that does not match says why in ``PassResult.not_fired``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs
from onnx import TensorProto

from qcompiler.graph import add_domain, constant_value, producer, scalar_value, subgraph_model, symbolic_shapes
from qcompiler.pass_manager import PassContext, PassResult
from qcompiler.plugins.ops import DOMAIN, FLASH_ATTENTION

__all__ = ["FuseAttention", "AttentionMatch"]

logger = logging.getLogger(__name__)

TARGETS = ("plugin", "onnxruntime")
# Sequence lengths at which a mask computed at run time is checked (with max_seq_len): the smallest
# ones, powers of two and one past them, where index arithmetic goes wrong first.
_CHECK_LENGTHS = (1, 2, 3, 5, 8, 16, 17, 64, 129, 1024)
_FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16)


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
    nan_guard: bool = False  # Where(IsNaN(P), 0, P) after the Softmax: rows without a key give 0


@dataclass(frozen=True)
class MaskForm:
    """What a mask keeps, in the kernel's terms: the causal triangle or everything, and where the graph
    input it reads as a key padding mask (None: it reads none)."""

    causal: bool
    padding: gs.Tensor | None = None


@dataclass(frozen=True)
class CheckPoint:
    """Sizes at which a mask computed at run time is checked: ``seq`` new tokens (the queries) after
    ``past`` cached ones (a KV cache's; 0 without one)."""

    batch: int
    seq: int
    past: int = 0

    @property
    def keys(self) -> int:
        return self.past + self.seq


def _check_points(max_seq_len: int, *, cache: bool, padded: bool) -> list[CheckPoint]:
    """The lengths of ``_CHECK_LENGTHS`` up to ``max_seq_len`` (and it) as keys, each as a prefill; with a
    KV cache also as a one-token decode step and as a chunk of a third of them after the rest. Four rows
    with a padding input while masks are small (its four patterns), else two."""
    points = []
    for keys in sorted({n for n in _CHECK_LENGTHS if n < max_seq_len} | {max_seq_len}):
        batch = 4 if padded and keys <= 1024 else 2
        seqs = {keys, 1, max(1, keys // 3)} if cache else {keys}
        points += [CheckPoint(batch, seq, keys - seq) for seq in sorted(seqs, reverse=True)]
    return points


def _dim(t: gs.Tensor, axis: int) -> int | None:
    """Static size of ``t``'s 4-D shape along ``axis``, else None."""
    if t.shape is None or len(t.shape) != 4 or not isinstance(t.shape[axis], int):
        return None
    return t.shape[axis]


def _strip_repeat_kv(t: gs.Tensor) -> tuple[gs.Tensor, list[gs.Node]]:
    """Reshape(Expand(Unsqueeze(x, 2))) -> x (HF repeat_kv); anything else -> t itself."""
    reshape = producer(t, "Reshape")
    expand = reshape and producer(reshape.inputs[0], "Expand")
    unsq = expand and producer(expand.inputs[0], "Unsqueeze")
    if not unsq:
        return t, []
    axes = unsq.attrs.get("axes")
    if axes is None and len(unsq.inputs) > 1:
        axes = constant_value(unsq.inputs[1])
    if axes is None or list(np.asarray(axes).reshape(-1)) != [2]:
        return t, []
    return unsq.inputs[0], [reshape, expand, unsq]


def _nan_guard(p: gs.Tensor) -> list[gs.Node]:
    """[IsNaN, Where] for ``Where(IsNaN(p), 0, p)``, else []. torch exports scaled_dot_product_attention
    with it: a row its mask leaves without a key (all -inf) gives NaN probabilities, zeroed here, so
    that row's output is 0, as the kernel's is."""
    isnan = next((n for n in p.outputs if n.op == "IsNaN"), None)
    where = next((n for n in p.outputs if n.op == "Where"), None)
    if (len(p.outputs) != 2 or isnan is None or where is None or len(isnan.outputs[0].outputs) != 1
            or where.inputs[0] is not isnan.outputs[0] or where.inputs[2] is not p or scalar_value(where.inputs[1]) != 0):
        return []
    return [isnan, where]


class FuseAttention:
    """Replaces attention subgraphs with one fused op.

    Args:
        target: "plugin" (qcompiler::FlashAttention for the TensorRT backend) or "onnxruntime"
            (com.microsoft.MultiHeadAttention, runnable and checkable on ONNX Runtime's CPU provider).
        max_seq_len: the longest sequence the compiled model is meant for. The plugin target checks a
            mask computed at run time at lengths up to it (the engine's profile should not exceed it).
    """

    name = "fuse_attention"

    def __init__(self, target: str = "plugin", max_seq_len: int = 4096):
        if target not in TARGETS:
            raise ValueError(f"FuseAttention: target must be one of {TARGETS}, got {target!r}")
        if not isinstance(max_seq_len, int) or max_seq_len < 1:
            raise ValueError(f"FuseAttention: max_seq_len must be a positive int, got {max_seq_len!r}")
        self.target = target
        self.max_seq_len = max_seq_len

    # ------------------------------------------------------------------------------------------ match
    def match(self, softmax: gs.Node) -> AttentionMatch | str:
        """The attention subgraph ending at ``softmax``, or the reason it is not one."""
        axis = softmax.attrs.get("axis", -1)
        x = softmax.inputs[0]
        if axis != -1 and not (x.shape is not None and axis == len(x.shape) - 1):
            return f"Softmax axis {axis} is not the last axis"
        out_t = softmax.outputs[0]
        after = []  # casts and a NaN guard between the Softmax and PV
        while True:
            # softmax(x, dtype=float32).to(v.dtype): the Cast that brings P to V's type (a no-op in a float32 graph)
            if len(out_t.outputs) == 1 and out_t.outputs[0].op == "Cast" and out_t.outputs[0].attrs.get("to") in _FLOAT_TYPES:
                after.append(out_t.outputs[0])
            elif guard := _nan_guard(out_t):
                after += guard
            else:
                break
            out_t = after[-1].outputs[0]
        if len(out_t.outputs) != 1 or out_t.outputs[0].op != "MatMul" or out_t.outputs[0].inputs[0] is not out_t:
            return (f"Softmax output does not feed exactly one MatMul as its left operand "
                    f"(it feeds {[n.op for n in out_t.outputs]})")
        pv = out_t.outputs[0]
        nodes = [softmax, pv, *after]
        masks: list[tuple[str, gs.Node]] = []
        t = x
        scale = 1.0
        qk = None
        for _ in range(8):  # a few masks, scales and casts, in any order
            if len(t.inputs) != 1:
                return f"tensor {t.name} has no producer on the score path"
            node = t.inputs[0]
            if len(t.outputs) != 1:
                return f"intermediate {t.name} has other consumers"
            if node.op == "MatMul":
                qk = node
                break
            if node.op in ("Mul", "Div"):
                c = scalar_value(node.inputs[1])
                other = node.inputs[0]
                if c is None and node.op == "Mul" and scalar_value(node.inputs[0]) is not None:
                    c, other = scalar_value(node.inputs[0]), node.inputs[1]
                if c is None or c == 0:
                    return f"{node.op} {node.name} on the score path is not by a constant scalar"
                scale = scale * c if node.op == "Mul" else scale / c
                nodes.append(node)
                t = other
            elif node.op == "Add":
                a, b = node.inputs
                if a.inputs and a.inputs[0].op in ("MatMul", "Mul", "Div", "Where", "Add", "Cast") and self._leads_to_qk(a):
                    t = a
                elif self._leads_to_qk(b):
                    t = b
                else:
                    stops = sorted({n.op for n in map(self._score_source, (a, b)) if n is not None and n.op != "Constant"})
                    return f"Add {node.name} does not sit on a QK^T path (the walk back stops at {', '.join(stops) or 'inputs'})"
                masks.append(("add", node))
                nodes.append(node)
            elif node.op == "Where":
                masks.append(("where", node))
                nodes.append(node)
                t = node.inputs[1]
            elif node.op == "Cast" and node.attrs.get("to") == TensorProto.FLOAT:  # scores widened for the softmax
                nodes.append(node)
                t = node.inputs[0]
            else:
                return f"{node.op} {node.name} between QK^T and Softmax is not a scale, a mask or a Cast to float32"
        if qk is None:
            return "no QK^T MatMul found within the score path"
        nodes.append(qk)
        q, kt = qk.inputs
        for side in ("q", "k"):  # scalar Mul on either operand (scale split between q and k)
            tt = q if side == "q" else kt
            mul = producer(tt, "Mul")
            if mul is not None and len(tt.outputs) == 1:
                c = scalar_value(mul.inputs[1])
                if c is not None:
                    scale *= c
                    nodes.append(mul)
                    if side == "q":
                        q = mul.inputs[0]
                    else:
                        kt = mul.inputs[0]
        tr = producer(kt, "Transpose")
        perm = list(tr.attrs.get("perm", [])) if tr is not None else []
        k_bshd = None
        if perm == [0, 1, 3, 2]:  # K^T of K [B, H, T, D]
            k = tr.inputs[0]
        elif perm == [0, 2, 3, 1]:  # K^T straight from the [B, T, H, D] view (BERT, GPT-2 exports)
            k_bshd = tr.inputs[0]
            k = gs.Variable(f"{kt.name}_k_bhsd", dtype=kt.dtype)  # made by a Transpose at rewrite time
        elif producer(kt, "Mul") is not None:
            return "K^T is scaled by a Mul whose factor is not a constant scalar (a scale computed at run time?)"
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
                              k_bshd, any(n.op == "IsNaN" for n in after))

    @staticmethod
    def _leads_to_qk(t: gs.Tensor) -> bool:
        source = FuseAttention._score_source(t)
        return source is not None and source.op == "MatMul"

    @staticmethod
    def _score_source(t: gs.Tensor) -> gs.Node | None:
        """Where the walk back from ``t`` through scales, masks and casts ends: QK^T's MatMul when ``t``
        is on a score path, else the node that stopped it (None for a graph input or constant)."""
        for _ in range(8):
            if len(t.inputs) != 1:
                return None
            node = t.inputs[0]
            if node.op == "MatMul":
                return node
            if node.op in ("Mul", "Div"):
                t = node.inputs[0] if scalar_value(node.inputs[1]) is not None else node.inputs[1]
            elif node.op == "Where":
                t = node.inputs[1]
            elif node.op == "Cast":
                t = node.inputs[0]
            elif node.op == "Add":
                sources = [FuseAttention._score_source(x) for x in node.inputs]
                return next((n for n in sources if n is not None and n.op == "MatMul"), sources[0] or sources[1])
            else:
                return node
        return None

    # ------------------------------------------------------------------------------------------- run
    def run(self, graph: gs.Graph, context: PassContext) -> PassResult:
        fused, not_fired = [], []
        mask_checks: dict[tuple[str, ...], MaskForm | str] = {}  # the layers share one mask: check it once
        shapes: dict[str, list[int | str]] | None = None
        for softmax in [n for n in graph.nodes if n.op == "Softmax"]:
            m = self.match(softmax)
            if isinstance(m, str):
                not_fired.append((softmax.name, m))
                continue
            if context.is_excluded(softmax.name):
                not_fired.append((softmax.name, "excluded by the user"))
                continue
            if self.target == "plugin":
                form = self._rewrite_plugin(graph, m, mask_checks)
                reason = form if isinstance(form, str) else ""
            else:
                heads = _dim(m.q, 1)
                if heads is None:  # TorchScript exports reshape by sizes computed at run time
                    shapes = symbolic_shapes(graph) if shapes is None else shapes
                    found = (shapes.get(m.q.name) or [None, None])[1]
                    heads = found if isinstance(found, int) and found > 0 else None
                reason = self._rewrite_ort(graph, m, heads)
            if reason:
                not_fired.append((softmax.name, reason))
                continue
            fused.append({"softmax": softmax.name, "scale": m.scale, "masks": [k for k, _ in m.masks],
                          "gqa": m.k_raw is not m.k})
            if self.target == "plugin":
                fused[-1].update(causal=form.causal, key_mask=form.padding.name if form.padding is not None else None)
        if fused:
            graph.cleanup().toposort()
        what = f"{DOMAIN}::{FLASH_ATTENTION}" if self.target == "plugin" else "com.microsoft.MultiHeadAttention"
        padded = sorted({d["key_mask"] for d in fused if d.get("key_mask")})
        masked = f" ({sum(bool(d.get('key_mask')) for d in fused)} with key_mask from {', '.join(padded)})" if padded else ""
        return PassResult(bool(fused), f"fused {len(fused)} attention subgraphs into {what}{masked}", fused, not_fired)

    def _detach(self, graph: gs.Graph, m: AttentionMatch) -> gs.Tensor:
        if m.k_bshd is not None:
            graph.nodes.append(gs.Node("Transpose", attrs={"perm": [0, 2, 1, 3]}, inputs=[m.k_bshd], outputs=[m.k]))
        out = m.out
        out.inputs.clear()
        return out

    def _rewrite_plugin(self, graph: gs.Graph, m: AttentionMatch,
                        mask_checks: dict[tuple[str, ...], MaskForm | str]) -> MaskForm | str:
        """The mask form the fused node takes, or why the subgraph is left as it is."""
        form = MaskForm(causal=False)
        if m.masks:
            terms = self._mask_terms(m)
            past = _cache_length(m.k_raw)
            key = (*(t.name for term in terms for t in term[1:] if t is not None), past or "")
            if key not in mask_checks:
                mask_checks[key] = self._mask_form(graph, terms, past)
            if isinstance(mask_checks[key], str):
                return mask_checks[key]
            form = mask_checks[key]
        inputs = [m.q, m.k_raw, m.v_raw]
        if form.padding is not None:
            name = f"{form.padding.name}_key_mask_int32"
            key_mask = next((t for n in form.padding.outputs if n.op == "Cast" for t in n.outputs if t.name == name), None)
            if key_mask is None:
                key_mask = gs.Variable(name, dtype=np.int32)
                graph.nodes.append(gs.Node("Cast", name=name, attrs={"to": TensorProto.INT32}, inputs=[form.padding],
                                           outputs=[key_mask]))
            inputs += [gs.Variable.empty(), key_mask]
        out = self._detach(graph, m)
        lse = gs.Variable(f"{out.name}_lse", dtype=np.float32)
        node = gs.Node(op=FLASH_ATTENTION, name=f"{m.softmax.name}_flash" if m.softmax.name else "", domain=DOMAIN,
                       attrs={"causal": int(form.causal), "scale": float(m.scale)}, inputs=inputs,
                       outputs=[out, lse])
        graph.nodes.append(node)
        add_domain(graph, DOMAIN)
        return form

    def _mask_terms(self, m: AttentionMatch) -> list[tuple[str, gs.Tensor, gs.Tensor | None]]:
        """("add", mask, None) for ``Add(scores, mask)``; ("where", cond, fill) for ``Where(cond, scores, fill)``."""
        terms = []
        for kind, node in m.masks:
            if kind == "add":
                on_path = 0 if self._leads_to_qk(node.inputs[0]) else 1
                terms.append(("add", node.inputs[1 - on_path], None))
            else:
                terms.append(("where", node.inputs[0], node.inputs[2]))
        return terms

    def _mask_form(self, graph: gs.Graph, terms: list[tuple[str, gs.Tensor, gs.Tensor | None]],
                   past: str | None) -> MaskForm | str:
        """What the masks keep (causal or not, and the padding input they read), or why it is not a form
        the kernel has.

        A constant mask is checked as it is. A mask computed at run time may read shapes and the values
        of one [batch, sequence] input (a padding mask); it is computed here with ONNX Runtime at lengths
        up to ``max_seq_len``, for padding patterns when it reads one, and must keep ``causal(i, j) and
        pad[b, j] != 0`` (or the same without the causal term) at each. A sliding window wider than every
        length checked would pass for causal, so an integer constant beyond ``max_seq_len`` in the mask's
        computation declines the fusion.
        """
        tensors = [t for term in terms for t in term[1:] if t is not None]
        if all(constant_value(t) is not None for t in tensors):
            values = {t.name: np.asarray(constant_value(t)) for t in tensors}
            keep = _kept(terms, values)
            if isinstance(keep, str) or keep.ndim < 2:
                return keep if isinstance(keep, str) else f"mask of shape {list(keep.shape)} is not over (query, key)"
            # one query row broadcast over the queries: as many queries as keys, the most it can be causal for
            return _matching_form(keep, None, keep.shape[-2] if keep.shape[-2] > 1 else keep.shape[-1], keep.shape[-1])
        closure = _mask_closure(tensors)
        if isinstance(closure, str):
            return closure
        nodes, inputs, integers, padding = closure
        wide = sorted({c for c in integers if self.max_seq_len < abs(c) < 2**31 - 1})
        if wide:
            return (f"the mask is computed with the constant {wide[0]}, beyond max_seq_len={self.max_seq_len} "
                    f"(a sliding window?), so it cannot be checked up to there")
        roles = _dimension_roles(inputs, padding, past)
        if isinstance(roles, str):
            return roles
        import onnxruntime as ort

        computed = [t for t in tensors if constant_value(t) is None]
        try:
            session = ort.InferenceSession(subgraph_model(graph, nodes, inputs, computed).SerializeToString(),
                                           providers=["CPUExecutionProvider"])
        except Exception as err:  # ONNX Runtime raises its own error types
            return f"the mask's computation does not run on its own in ONNX Runtime: {str(err).splitlines()[0]}"
        constants = {t.name: np.asarray(constant_value(t)) for t in tensors if constant_value(t) is not None}
        forms = [MaskForm(True, padding), MaskForm(False, padding)]
        reasons: dict[bool, str] = {}  # by causal: why the form failed, at the length where it did
        rng = np.random.default_rng(0)
        for point in _check_points(self.max_seq_len, cache=past is not None, padded=padding is not None):
            feeds = _shape_feeds(inputs, roles, point)
            pad = None
            if padding is not None:
                pad = _padding_patterns(*feeds[padding.name].shape, rng)
                feeds[padding.name] = pad.astype(feeds[padding.name].dtype)
            names = [t.name for t in computed]
            at = f"{point.seq} new tokens after {point.past} cached" if point.past else f"sequence length {point.seq}"
            try:
                values = dict(zip(names, session.run(names, feeds), strict=True))
            except Exception as err:  # ONNX Runtime raises its own error types
                return f"the mask's computation fails at {at}: {str(err).splitlines()[0]}"
            keep = _kept(terms, {**constants, **values})
            failed_now = []
            for form in list(forms):
                reason = _matching_form(keep, pad, point.seq, point.keys, causal=form.causal)
                if isinstance(reason, str):
                    forms.remove(form)
                    failed_now.append(form.causal)
                    reasons[form.causal] = f"{reason} (mask computed at run time, at {at})"
            if not forms:  # the reason of the form that held longest (the causal one's on a tie)
                return reasons[max(failed_now)]
        return forms[0]

    def _rewrite_ort(self, graph: gs.Graph, m: AttentionMatch, heads: int | None) -> str:
        if heads is None:
            return "number of heads (dim 1 of Q) is not static, nor found by symbolic shape inference"
        name = m.softmax.name or m.out.name

        def to_bsh(t: gs.Tensor, tag: str) -> gs.Tensor:
            tr = gs.Variable(f"{name}_{tag}_bshd", dtype=t.dtype)
            r = gs.Variable(f"{name}_{tag}_bsh", dtype=t.dtype)
            graph.nodes.append(gs.Node("Transpose", attrs={"perm": [0, 2, 1, 3]}, inputs=[t], outputs=[tr]))
            shape = gs.Constant(f"{name}_{tag}_shape", np.array([0, 0, -1], np.int64))
            graph.nodes.append(gs.Node("Reshape", inputs=[tr, shape], outputs=[r]))
            return r

        bias = None
        for kind, mask, fill in self._mask_terms(m):
            if kind == "add":
                term = mask
            else:
                term = gs.Variable(f"{name}_where_bias_{len(graph.nodes)}", dtype=np.float32)
                zero = gs.Constant(f"{name}_zero_{len(graph.nodes)}", np.zeros((), np.float32))
                graph.nodes.append(gs.Node("Where", inputs=[mask, zero, fill], outputs=[term]))
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
            if m.nan_guard:
                # -inf over a whole row would make MultiHeadAttention's output NaN there, and NaN K/V at
                # those positions would reach every row of later layers (0 * NaN): the lowest float keeps it finite
                finite = gs.Variable(f"{name}_bias_finite", dtype=np.float32)
                lowest = gs.Constant(f"{name}_lowest", np.array(np.finfo(np.float32).min, np.float32))
                graph.nodes.append(gs.Node("Max", inputs=[bias, lowest], outputs=[finite]))
                bias = finite
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


def _kept(terms: list[tuple[str, gs.Tensor, gs.Tensor | None]], values: dict[str, np.ndarray]) -> np.ndarray | str:
    """Where the masks, given their tensors' values, keep a score (bool, broadcast over the terms), or why
    they are not masks (an additive term other than 0 and large negatives, a fill that is not one)."""
    keep = None
    for kind, mask, fill in terms:
        if kind == "add":
            additive = np.asarray(values[mask.name], np.float64)
            if not np.all((additive == 0) | (additive <= -1e4)):
                return "additive mask holds values other than 0 and large negatives"
            kept = additive == 0
        else:
            fill_value = np.asarray(values[fill.name])
            if fill_value.size != 1:
                return "Where mask fills with a tensor, not a scalar"
            if float(fill_value.reshape(-1)[0]) > -1e4:
                return f"Where fill value {float(fill_value.reshape(-1)[0])} is not a large negative"
            kept = np.asarray(values[mask.name], bool)
        try:
            keep = kept if keep is None else keep & kept
        except ValueError:
            return f"masks of shapes {keep.shape} and {kept.shape} do not broadcast"
    return keep


def _matching_form(keep: np.ndarray | str, pad: np.ndarray | None, seq: int, keys: int, *,
                   causal: bool = True) -> MaskForm | str:
    """``keep`` against ``causal(i, j) and pad[b, j] != 0`` over [batch, head, query, key], for ``seq``
    queries (the last ``seq`` of ``keys`` positions: causal(i, j) is j <= i + keys - seq): a MaskForm if
    equal, else why not. Rows the expected mask leaves empty are not compared (see the module docstring)."""
    if isinstance(keep, str):
        return keep
    if keep.ndim < 2 or keep.shape[-1] != keys or keep.shape[-2] not in (1, seq):
        return f"mask of shape {list(keep.shape)} is not {seq} x {keys} over (query, key)"
    expected = np.tri(seq, keys, keys - seq, dtype=bool) if causal else np.ones((seq, keys), bool)
    if pad is not None:
        expected = expected & (pad != 0)[:, None, None, :]
    try:
        keep = np.broadcast_to(keep, np.broadcast_shapes(keep.shape, expected.shape))
    except ValueError:
        return f"mask of shape {list(keep.shape)} does not match the padding input's batch"
    expected = np.broadcast_to(expected, keep.shape)
    compared = expected.any(-1, keepdims=True)
    if not np.all((keep == expected) | ~compared):
        what = "causal (lower-triangular)" if causal else "all-keeping"
        return f"mask is not the {what} mask{' and the padding' if pad is not None else ''}, in every batch and head"
    return MaskForm(causal, None)


def _padding_patterns(batch: int, length: int, rng: np.random.Generator) -> np.ndarray:
    """0/1 [batch, length] padding masks: left padding, random holes, and with four rows right padding and
    none. Left/right padding leave a third of the sequence (at least one position) empty."""
    pad = max(1, length // 3)
    rows = [np.arange(length) >= pad, rng.integers(0, 2, length).astype(bool)]
    if batch >= 4:
        rows += [np.arange(length) < length - pad, np.ones(length, bool)]
    return np.stack(rows[:batch]).astype(np.int64)


def _mask_closure(tensors: list[gs.Tensor]) -> tuple[list[gs.Node], list[gs.Tensor], list[int], gs.Tensor | None] | str:
    """The nodes computing ``tensors``, the graph inputs they read, the integer constants their values
    depend on, and the one input whose values they read (through anything but Shape/Size), if any; or
    why they do not fit (several such inputs, one that is not [batch, sequence], control flow)."""
    nodes: dict[int, gs.Node] = {}
    inputs: dict[str, gs.Tensor] = {}
    by_value_inputs: dict[str, gs.Tensor] = {}
    integers: list[int] = []
    seen: set[tuple[str, bool]] = set()
    stack = [(t, True) for t in tensors]
    while stack:
        tensor, by_value = stack.pop()
        if (tensor.name, True) in seen or (tensor.name, by_value) in seen:
            continue
        seen.add((tensor.name, by_value))
        value = constant_value(tensor)
        if value is not None:
            if by_value and np.issubdtype(np.asarray(value).dtype, np.integer) and np.asarray(value).size <= 64:
                integers += [int(c) for c in np.asarray(value).reshape(-1)]
            if tensor.inputs:  # a Constant node
                nodes[id(tensor.inputs[0])] = tensor.inputs[0]
            continue
        if not tensor.inputs:
            inputs[tensor.name] = tensor
            if by_value:
                by_value_inputs[tensor.name] = tensor
            continue
        node = tensor.inputs[0]
        if any(isinstance(v, gs.Graph) for v in node.attrs.values()):
            return f"the mask is computed with control flow ({node.op} {node.name})"
        nodes[id(node)] = node
        reads_values = by_value and node.op not in ("Shape", "Size")
        stack += [(t, reads_values) for t in node.inputs if t.name]
    if len(by_value_inputs) > 1:
        return (f"the mask reads the values of graph inputs {sorted(by_value_inputs)}; the plugin takes a causal "
                f"mask and one padding input")
    padding = next(iter(by_value_inputs.values()), None)
    if padding is not None and (padding.shape is None or len(padding.shape) != 2 or padding.dtype is None
                                or np.dtype(padding.dtype).kind not in "biuf"):
        return (f"the mask reads the values of graph input {padding.name} {padding.shape}, not a [batch, sequence] "
                f"padding mask")
    return list(nodes.values()), list(inputs.values()), integers, padding


def _cache_length(k: gs.Tensor) -> str | None:
    """The dimension symbol of the cached sequence when ``k`` is ``Concat(past, new, axis=2)`` with ``past`` a
    graph input [batch, heads, past, head_dim] (a KV cache, as exports with ``past_key_values`` feed it),
    else None."""
    concat = producer(k, "Concat")
    if concat is None or len(concat.inputs) != 2 or concat.attrs.get("axis") not in (2, -2):
        return None
    past = concat.inputs[0]
    while past.inputs and past.inputs[0].op in ("Identity", "Cast", "Concat") and len(past.inputs[0].inputs) == 1:
        past = past.inputs[0].inputs[0]
    if past.inputs or past.shape is None or len(past.shape) != 4 or not isinstance(past.shape[2], str):
        return None
    return past.shape[2]


def _dimension_roles(inputs: list[gs.Tensor], padding: gs.Tensor | None, past: str | None) -> dict[str, str] | str:
    """What each dimension symbol of the inputs a run-time mask reads stands for, or why that cannot be
    told. "batch": axis 0 of the padding input, else of the first input of rank 2 or more. Without a KV
    cache, the one other symbol is "seq", the sequence. With one: ``past`` is "past", the cached length;
    the padding input's axis 1 "keys" (past and new tokens); the one other symbol "seq" (new tokens)."""
    for t in inputs:
        if t.shape is None or t.dtype is None:
            return f"input {t.name} has no static rank or type"
        if any(not isinstance(d, (int, str)) or isinstance(d, int) and d < 0 for d in t.shape):
            return f"input {t.name} {list(t.shape)} has a dimension with neither a size nor a name"
    first = padding if padding is not None else next((t for t in inputs if len(t.shape) >= 2), None)
    roles = {first.shape[0]: "batch"} if first is not None and isinstance(first.shape[0], str) else {}
    if past is not None:
        roles.setdefault(past, "past")
        if padding is not None and isinstance(padding.shape[1], str):
            roles.setdefault(padding.shape[1], "keys")
    seq = sorted({d for t in inputs for d in t.shape if isinstance(d, str)} - set(roles))
    if len(seq) > 1:
        what = "the sequence" if past is None else "the new tokens"
        return f"cannot tell which of the dimensions {seq} of inputs {[t.name for t in inputs]} is {what}"
    return roles | dict.fromkeys(seq, "seq")


def _shape_feeds(inputs: list[gs.Tensor], roles: dict[str, str], point: CheckPoint) -> dict[str, np.ndarray]:
    """Zeros for the inputs whose shapes a run-time mask reads, sized by their dimensions' roles at ``point``."""
    sizes = {"batch": point.batch, "seq": point.seq, "past": point.past, "keys": point.keys}
    return {t.name: np.zeros([d if isinstance(d, int) else sizes[roles[d]] for d in t.shape], t.dtype) for t in inputs}
