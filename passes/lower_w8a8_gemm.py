"""Lowers per-token W8A8 Q/DQ GEMMs to ``qcompiler::QuantizePerToken`` + ``qcompiler::W8A8Gemm`` (TensorRT plugins).

Recognised: what ``InsertQDQ`` with per-token dynamic activations and ``FuseQuant(target="tensorrt")``
leave in front of a weighted GEMM::

    x ─┬─ ReduceMax ─┐
       └─ ReduceMin ─ Neg ─ Max ─ Div(127) ─ Max(floor) = s ─ QuantizeLinear(x, s, block K) ─ DequantizeLinear ─┐
    W_int8 [K, N] (or [N, K] under Gemm transB) ─ DequantizeLinear(s_w per channel) ───────────── MatMul / Gemm ─ y

becomes::

    x ─ QuantizePerToken ─ (x_q int8, s) ─ W8A8Gemm(x_q, s, W_int8 [N, K], s_w[, Gemm's bias]) ─ [Cast] ─ y

Both compute ``y = (q_x q_w) s s_w`` with ``q_x = round_half_even(x / s)``, ``s = max|x| / 127`` per row:
the same function, except that QuantizePerToken floors max|x| at 1e-8 where the graph floors s at
1e-12, which changes only rows whose max|x| is below 1e-8 (their error stays below 1e-10). W8A8Gemm
writes float16; in a float32 graph a Cast brings y back to float32. GEMMs reading one activation share
one QuantizePerToken, as they shared one quantizer.

When that activation is an RMSNorm (as exports write it out) or a LayerNormalization of the last axis,
and nothing else reads it, the norm moves into QuantizePerToken (``norm``, ``gamma``, ``beta``,
``epsilon``): the kernel normalises the row it quantizes, so the normalised activations are never
written to memory. That is the same function up to float rounding.

Declined (reason in ``not_fired``): static per-tensor activation scales (W8A8Gemm takes a scale per
row), activation scales not computed as above, weights that are not constant int8 with symmetric
per-output-channel scales, and Gemm with transA or alpha/beta other than 1.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from qcompiler.graph import add_domain, constant_value, producer, scalar_value, value_readers
from qcompiler.pass_manager import PassContext, PassResult
from qcompiler.plugins.ops import DOMAIN, QUANTIZE_PER_TOKEN, W8A8_GEMM

__all__ = ["LowerW8A8Gemm"]

logger = logging.getLogger(__name__)


def _is_row_absmax_scale(scale: gs.Tensor, x: gs.Tensor) -> bool:
    """``scale`` is Max(Div(max|x| over the last axis, 127), a tiny constant floor), with max|x| as
    Max(ReduceMax(x), Neg(ReduceMin(x))) or ReduceMax(Abs(x))."""
    floor = producer(scale, "Max")
    if floor is None or len(floor.inputs) != 2:
        return False
    div, bound = next(((producer(a, "Div"), scalar_value(b)) for a, b in (floor.inputs, floor.inputs[::-1]) if producer(a, "Div")),
                      (None, None))
    if div is None or bound is None or not 0 < bound < 1e-6 or scalar_value(div.inputs[1]) != 127.0:
        return False
    absmax = div.inputs[0]

    def reduces_x(t: gs.Tensor, op: str, through: str | None = None) -> bool:
        node = producer(t, op)
        if node is None or not node.attrs.get("keepdims", 1):
            return False
        axes = node.attrs.get("axes")
        if axes is None and len(node.inputs) > 1:
            axes = constant_value(node.inputs[1])
        rank = len(x.shape) if x.shape is not None else None
        if axes is None or [int(a) for a in np.asarray(axes).reshape(-1)] not in ([-1], [rank - 1] if rank else [-1]):
            return False
        source = node.inputs[0]
        if through is not None:
            inner = producer(source, through)
            source = inner.inputs[0] if inner is not None else None
        return source is x

    if reduces_x(absmax, "ReduceMax", "Abs"):
        return True
    both = producer(absmax, "Max")
    if both is None or len(both.inputs) != 2:
        return False
    a, b = both.inputs
    for top, neg in ((a, b), (b, a)):
        negation = producer(neg, "Neg")
        if reduces_x(top, "ReduceMax") and negation is not None and reduces_x(negation.inputs[0], "ReduceMin"):
            return True
    return False


class LowerW8A8Gemm:
    """Per-token W8A8 Q/DQ GEMMs -> QuantizePerToken + W8A8Gemm (no configuration)."""

    name = "lower_w8a8_gemm"

    def run(self, graph: gs.Graph, context: PassContext) -> PassResult:
        lowered, not_fired = [], []
        quantized: dict[str, tuple[gs.Variable, gs.Variable]] = {}  # x -> (x_q, s), one per activation
        for gemm in [n for n in graph.nodes if n.op in ("MatMul", "Gemm")]:
            match = self._match(gemm)
            if match is None:
                continue  # not a Q/DQ GEMM: nothing to say
            if isinstance(match, str):
                not_fired.append((gemm.name, match))
                continue
            if context.is_excluded(gemm.name):
                not_fired.append((gemm.name, "excluded by the user"))
                continue
            x, w_nk, w_scale, bias = match
            if x.name not in quantized:
                quantized[x.name] = (gs.Variable(f"{x.name}/qpt_q", dtype=np.int8), gs.Variable(f"{x.name}/qpt_scale", dtype=np.float32))
                graph.nodes.append(gs.Node(QUANTIZE_PER_TOKEN, f"{x.name}/QuantizePerToken", domain=DOMAIN,
                                           attrs={"norm": "none", "epsilon": 1e-6}, inputs=[x], outputs=list(quantized[x.name])))
            x_q, x_s = quantized[x.name]
            y = gemm.outputs[0]
            half = np.dtype(x.dtype) == np.float16 if x.dtype is not None else False
            out = y if half else gs.Variable(f"{y.name}/fp16", dtype=np.float16)
            inputs = [x_q, x_s, gs.Constant(f"{gemm.name}/w8_nk", w_nk), gs.Constant(f"{gemm.name}/w8_scale", w_scale)]
            if bias is not None:
                inputs.append(gs.Constant(f"{gemm.name}/w8_bias", bias.astype(np.float16)))
            gemm.outputs.clear()
            graph.nodes.append(gs.Node(W8A8_GEMM, f"{gemm.name}/W8A8Gemm", domain=DOMAIN,
                                       attrs={"out_dtype": onnx.TensorProto.FLOAT16}, inputs=inputs, outputs=[out]))
            if not half:
                graph.nodes.append(gs.Node("Cast", f"{gemm.name}/to_fp32", attrs={"to": onnx.TensorProto.FLOAT},
                                           inputs=[out], outputs=[y]))
            lowered.append({"node": gemm.name, "N": int(w_nk.shape[0]), "K": int(w_nk.shape[1]), "bias": bias is not None})
        fused_norms = 0
        if lowered:
            add_domain(graph, DOMAIN)
            graph.cleanup()
            fused_norms = sum(_fuse_norm(graph, node) for node in graph.nodes if node.op == QUANTIZE_PER_TOKEN)
            graph.cleanup().toposort()
        return PassResult(bool(lowered), f"lowered {len(lowered)} W8A8 GEMMs to {DOMAIN}::{W8A8_GEMM} "
                          f"({len(quantized)} {DOMAIN}::{QUANTIZE_PER_TOKEN}, {fused_norms} with their RMSNorm/LayerNorm "
                          f"fused)", lowered, not_fired)

    @staticmethod
    def _match(gemm: gs.Node):
        """None (not a W8A8 Q/DQ GEMM), the reason it cannot be lowered, or (x, W int8 [N, K], s_w, bias)."""
        act_dq = producer(gemm.inputs[0], "DequantizeLinear")
        w_dq = producer(gemm.inputs[1], "DequantizeLinear")
        if act_dq is None or w_dq is None:
            return None
        act_q = producer(act_dq.inputs[0], "QuantizeLinear")
        if act_q is None:
            return "the activation's DequantizeLinear does not read a QuantizeLinear"
        x, scale = act_q.inputs[0], act_q.inputs[1]
        if constant_value(scale) is not None:
            return "static per-tensor activation scale (W8A8Gemm takes one scale per row)"
        if act_dq.inputs[1] is not scale or not _is_row_absmax_scale(scale, x):
            return "activation scale is not max|x| / 127 per row"
        if any(constant_value(t) is not None and np.any(constant_value(t)) for t in act_q.inputs[2:] + act_dq.inputs[2:]):
            return "activation zero point is not 0"
        w_q, w_scale = constant_value(w_dq.inputs[0]), constant_value(w_dq.inputs[1])
        if w_q is None or w_q.dtype != np.int8 or w_q.ndim != 2 or w_scale is None:
            return "weight is not a constant int8 matrix with constant scales"
        if len(w_dq.inputs) > 2 and w_dq.inputs[2].name:
            zero_point = constant_value(w_dq.inputs[2])
            if zero_point is None or np.any(zero_point):
                return "weight zero point is not 0"
        transposed = gemm.op == "Gemm" and bool(gemm.attrs.get("transB", 0))
        if gemm.op == "Gemm" and (gemm.attrs.get("transA", 0) or gemm.attrs.get("alpha", 1.0) != 1.0
                                  or gemm.attrs.get("beta", 1.0) != 1.0):
            return "Gemm with transA or alpha/beta other than 1"
        w_nk = w_q if transposed else w_q.T
        n = w_nk.shape[0]
        w_scale = np.broadcast_to(np.asarray(w_scale, np.float32).reshape(-1), (n,)).copy()
        if int(w_dq.attrs.get("axis", 1)) % 2 != (0 if transposed else 1) and np.asarray(constant_value(w_dq.inputs[1])).size > 1:
            return "weight scales are not per output channel"
        bias = None
        if gemm.op == "Gemm" and len(gemm.inputs) > 2 and gemm.inputs[2].name:
            bias = constant_value(gemm.inputs[2])
            if bias is None or bias.size != n:
                return "Gemm bias is not a constant vector of N"
            bias = bias.reshape(n)
        return x, np.ascontiguousarray(w_nk), w_scale, bias


def _norm_of(x: gs.Tensor) -> tuple[str, gs.Tensor, np.ndarray, np.ndarray | None, float] | None:
    """(kind, input h, gamma, beta, epsilon) when ``x`` is RMSNorm(h) * gamma, written out as exports write
    it (Pow or Mul for h^2, ReduceMean over the last axis, Add eps, Sqrt, then Div, or Reciprocal / 1-Div
    and Mul, with float Casts around), or LayerNormalization(h, gamma, beta) over the last axis; else None."""
    layer = producer(x, "LayerNormalization")
    if layer is not None:
        gamma = constant_value(layer.inputs[1])
        beta = constant_value(layer.inputs[2]) if len(layer.inputs) > 2 and layer.inputs[2].name else None
        if gamma is None or int(layer.attrs.get("axis", -1)) not in (-1, len(x.shape or [0]) - 1) or len(layer.outputs) > 1 and any(
                o.outputs for o in layer.outputs[1:]):
            return None
        if len(layer.inputs) > 2 and layer.inputs[2].name and beta is None:
            return None
        return "layer", layer.inputs[0], gamma, beta, float(layer.attrs.get("epsilon", 1e-5))
    scaled = producer(x, "Mul")
    if scaled is None:
        return None
    gamma, normed = next(((constant_value(a), b) for a, b in (scaled.inputs, scaled.inputs[::-1]) if constant_value(a) is not None),
                         (None, None))
    if gamma is None or gamma.ndim != 1:
        return None
    normed = _through_float_casts(normed)
    divide = producer(normed, "Div")
    if divide is not None and scalar_value(divide.inputs[0]) != 1.0:
        h, rms = divide.inputs
    else:
        times = producer(normed, "Mul")
        if times is None:
            return None
        found = next(((a, _reciprocal_of(b)) for a, b in (times.inputs, times.inputs[::-1]) if _reciprocal_of(b) is not None), None)
        if found is None:
            return None
        h, rms = found
    sqrt = producer(rms, "Sqrt")
    add = sqrt and producer(sqrt.inputs[0], "Add")
    if add is None:
        return None
    mean_t, eps = next(((a, scalar_value(b)) for a, b in (add.inputs, add.inputs[::-1]) if scalar_value(b) is not None), (None, None))
    mean = mean_t is not None and producer(mean_t, "ReduceMean")
    if not mean or not mean.attrs.get("keepdims", 1):
        return None
    axes = mean.attrs.get("axes")
    if axes is None and len(mean.inputs) > 1:
        axes = constant_value(mean.inputs[1])
    if axes is None or [int(a) for a in np.asarray(axes).reshape(-1)] not in ([-1], [len(h.shape) - 1] if h.shape else [-1]):
        return None
    square = producer(mean.inputs[0], "Pow", "Mul")
    if square is None:
        return None
    if square.op == "Pow" and not (square.inputs[0] is h and scalar_value(square.inputs[1]) == 2.0):
        return None
    if square.op == "Mul" and not (square.inputs[0] is h and square.inputs[1] is h):
        return None
    return "rms", _through_float_casts(h), gamma, None, float(eps)


def _through_float_casts(t: gs.Tensor) -> gs.Tensor:
    """``t`` before any Casts to a float type (``h.to(float32)`` around a norm, which computes in float32 anyway)."""
    while (cast := producer(t, "Cast")) is not None and cast.attrs.get("to") in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                                                                                 onnx.TensorProto.BFLOAT16):
        t = cast.inputs[0]
    return t


def _reciprocal_of(t: gs.Tensor) -> gs.Tensor | None:
    """r when ``t`` is Reciprocal(r) or Div(1, r) (TorchScript writes rsqrt as 1 / Sqrt)."""
    node = producer(t, "Reciprocal", "Div")
    if node is None or (node.op == "Div" and scalar_value(node.inputs[0]) != 1.0):
        return None
    return node.inputs[-1]


def _fuse_norm(graph: gs.Graph, quantize: gs.Node) -> bool:
    """Moves the RMSNorm/LayerNorm that produces ``quantize``'s input into it (norm, gamma, beta, epsilon)
    when nothing else reads the normalised tensor's values (Shape readers move to the norm's input): the
    kernel normalises the row it quantizes, so the normalised activations are never written out."""
    x = quantize.inputs[0]
    if x in graph.outputs or any(n is not quantize for n in value_readers(x)):
        return False
    norm = _norm_of(x)
    if norm is None:
        return False
    kind, h, gamma, beta, epsilon = norm
    for shape in [n for n in x.outputs if n is not quantize]:  # Shape readers (TorchScript): a norm keeps its input's shape
        shape.inputs[0] = h
    name = quantize.name
    inputs = [h, gs.Constant(f"{name}/gamma", np.asarray(gamma, np.float32).reshape(-1))]
    if kind == "layer":
        inputs.append(gs.Constant(f"{name}/beta", np.zeros_like(inputs[1].values) if beta is None
                                  else np.asarray(beta, np.float32).reshape(-1)))
    quantize.inputs.clear()
    quantize.inputs.extend(inputs)
    quantize.attrs.update(norm=kind, epsilon=epsilon)
    return True
