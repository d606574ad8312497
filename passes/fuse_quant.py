"""FuseQuant: fold, merge and lower Q/DQ so the model is small on disk and runs int8 kernels.

Steps (each reported):

1. **Fold weight quantizers.** QuantizeLinear of a constant becomes an int8 initializer
   (q = saturate(round_half_even(W / s) + z), ONNX's definition), leaving int8 + DequantizeLinear:
   weights ~4x smaller than fp32.
2. **Merge duplicates.** Several QuantizeLinear (or DequantizeLinear) nodes reading the same tensor
   with the same scale and zero point become one.
3. **Drop redundant chains.** Q(DQ(q)) with the same scale/zero point is q.
4. **Lower for ONNX Runtime** (``target="onnxruntime"``). Left as Q/DQ, ONNX Runtime's CPU provider
   dequantizes and runs a float MatMul for per-token (blocked) quantizers. The rewrite makes it run
   MLAS's u8s8 integer GEMM, with
       Y = (Xq_u8 - 128) Wq  * s_x * s_w   (com.microsoft.MatMulIntegerToFloat)
   Symmetric int8 activations are shifted to uint8 with zero point 128 (exactly the same values: the
   symmetric grid never produces -128), because MLAS's s8s8 path is ~15x slower than u8s8 on x86.
   Per-token scales cannot be a MatMulIntegerToFloat input (it takes per-tensor A scales), so the
   rows are quantized by the same blocked QuantizeLinear (zero point 128 in every block) and the
   integer product is multiplied by the row scales afterwards. For ``target="tensorrt"`` the standard Q/DQ form is kept (TensorRT fuses it).
"""

from __future__ import annotations

import logging
from collections import defaultdict

import numpy as np
import onnx_graphsurgeon as gs

from qcompiler.graph import add_domain, constant_value
from qcompiler.pass_manager import PassContext, PassResult

__all__ = ["FuseQuant"]

logger = logging.getLogger(__name__)

_TARGETS = ("onnxruntime", "tensorrt")
_UINT8_SHIFT = 128


def _broadcast(param: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    if param.ndim == 0 or param.size == 1:
        return param.reshape(())
    shape = [1] * ndim
    shape[axis % ndim] = param.size
    return param.reshape(shape)


def _same_constant(a: gs.Tensor | None, b: gs.Tensor | None) -> bool:
    if a is b:
        return True
    if a is None or b is None:
        return False
    va, vb = constant_value(a), constant_value(b)
    return va is not None and vb is not None and va.dtype == vb.dtype and va.shape == vb.shape and np.array_equal(va, vb)


def _bypass(node: gs.Node, replacement: gs.Tensor) -> None:
    """Points every reader of ``node``'s output at ``replacement``; cleanup() then drops the node."""
    out = node.outputs[0]
    for consumer in list(out.outputs):
        consumer.inputs[consumer.inputs.index(out)] = replacement
    node.outputs.clear()


def _optional_input(node: gs.Node, index: int) -> gs.Tensor | None:
    if len(node.inputs) > index and node.inputs[index].name:
        return node.inputs[index]
    return None


class FuseQuant:
    """Folds/merges Q/DQ and, for ONNX Runtime, lowers W8A8 GEMMs to integer kernels.

    Args:
        target: "onnxruntime" (lower to MatMulIntegerToFloat) or "tensorrt" (keep standard Q/DQ).
    """

    name = "fuse_quant"

    def __init__(self, target: str = "onnxruntime"):
        if target not in _TARGETS:
            raise ValueError(f"FuseQuant target must be one of {_TARGETS}, got {target!r}")
        self.target = target

    def run(self, graph: gs.Graph, context: PassContext) -> PassResult:
        folded = self._fold_constant_quantizers(graph)
        merged = dropped = 0
        while True:  # each rewrite can expose another (a dropped chain leaves duplicate DQs)
            step_dropped = self._drop_redundant_chains(graph)
            step_merged = self._merge_duplicates(graph, "QuantizeLinear") + self._merge_duplicates(graph, "DequantizeLinear")
            graph.cleanup()
            dropped, merged = dropped + step_dropped, merged + step_merged
            if not (step_dropped or step_merged):
                break
        result = PassResult(changed=bool(folded or merged or dropped))
        lowered = 0
        if self.target == "onnxruntime":
            lowered = self._lower_for_onnxruntime(graph, result)
            result.changed |= bool(lowered)
        result.summary = (f"folded {folded} weight quantizers, merged {merged} duplicates, dropped {dropped} "
                          f"redundant Q/DQ pairs, lowered {lowered} GEMMs to integer kernels ({self.target})")
        return result

    # --- 1. constant folding ---------------------------------------------------------------------

    def _fold_constant_quantizers(self, graph: gs.Graph) -> int:
        count = 0
        for node in list(graph.nodes):
            if node.op != "QuantizeLinear" or "block_size" in node.attrs:
                continue
            x, scale = constant_value(node.inputs[0]), constant_value(node.inputs[1])
            zero_tensor = _optional_input(node, 2)
            zero = constant_value(zero_tensor) if zero_tensor is not None else np.zeros((), np.uint8)
            if x is None or scale is None or zero is None:
                continue
            axis = node.attrs.get("axis", 1)
            if zero.dtype not in (np.int8, np.uint8):
                continue
            info = np.iinfo(zero.dtype)
            q = np.rint(x / _broadcast(scale, x.ndim, axis)) + _broadcast(zero, x.ndim, axis).astype(np.float64)
            folded = gs.Constant(f"{node.inputs[0].name}_{zero.dtype.name}", np.clip(q, info.min, info.max).astype(zero.dtype))
            _bypass(node, folded)
            count += 1
        return count

    # --- 2. duplicates -----------------------------------------------------------------------------

    def _merge_duplicates(self, graph: gs.Graph, op: str) -> int:
        by_input: dict[int, list[gs.Node]] = defaultdict(list)
        for node in graph.nodes:
            if node.op == op and node.outputs:
                by_input[id(node.inputs[0])].append(node)
        count = 0
        for nodes in by_input.values():
            keep = nodes[0]
            for dup in nodes[1:]:
                if dup.attrs != keep.attrs or not all(
                        _same_constant(_optional_input(dup, i), _optional_input(keep, i)) for i in (1, 2)):
                    continue
                out = dup.outputs[0]
                if out in graph.outputs:
                    continue
                _bypass(dup, keep.outputs[0])
                count += 1
        return count

    # --- 3. Q(DQ(q)) -----------------------------------------------------------------------------

    def _drop_redundant_chains(self, graph: gs.Graph) -> int:
        count = 0
        for node in graph.nodes:
            if node.op != "QuantizeLinear" or not node.inputs[0].inputs:
                continue
            dq = node.inputs[0].inputs[0]
            if dq.op != "DequantizeLinear" or dq.attrs != node.attrs and \
                    {k: v for k, v in node.attrs.items() if k != "output_dtype"} != dq.attrs:
                continue
            if not all(_same_constant(_optional_input(dq, i), _optional_input(node, i)) for i in (1, 2)):
                continue
            original = dq.inputs[0]
            out = node.outputs[0]
            if out in graph.outputs or original.dtype != out.dtype:
                continue
            _bypass(node, original)
            count += 1
        return count

    # --- 4. lowering ---------------------------------------------------------------------------------

    def _lower_for_onnxruntime(self, graph: gs.Graph, result: PassResult) -> int:
        shifted: dict[int, tuple[gs.Variable, gs.Tensor | None]] = {}
        count = 0
        for node in list(graph.nodes):
            if node.op not in ("MatMul", "Gemm"):
                continue
            match = self._match_w8a8(node)
            if isinstance(match, str):
                if match:
                    result.not_fired.append((node.name, match))
                continue
            act_q, weight_int8, weight_scale, transposed = match
            if id(act_q) not in shifted:
                shifted[id(act_q)] = self._uint8_activation(graph, act_q)
            xq_u8, row_scale = shifted[id(act_q)]
            self._rewrite_gemm(graph, node, act_q, xq_u8, row_scale, weight_int8, weight_scale, transposed)
            count += 1
        if count:
            add_domain(graph, "com.microsoft")
        return count

    @staticmethod
    def _match_w8a8(node: gs.Node):
        """(activation Q node, int8 weight [K,N], weight scale [N], transposed) or a reason string."""
        a_dq = node.inputs[0].inputs[0] if node.inputs[0].inputs else None
        w_dq = node.inputs[1].inputs[0] if node.inputs[1].inputs else None
        if a_dq is None or w_dq is None or a_dq.op != "DequantizeLinear" or w_dq.op != "DequantizeLinear":
            return ""  # not a quantized GEMM at all: nothing to say
        if node.op == "Gemm" and (node.attrs.get("transA", 0) or node.attrs.get("alpha", 1.0) != 1.0
                                  or node.attrs.get("beta", 1.0) != 1.0):
            return "Gemm with transA/alpha/beta is not lowered"
        weight = constant_value(w_dq.inputs[0])
        w_scale = constant_value(w_dq.inputs[1])
        w_zero = _optional_input(w_dq, 2)
        if weight is None or weight.dtype != np.int8 or weight.ndim != 2 or w_scale is None:
            return "weight is not a constant int8 matrix"
        if w_zero is not None and np.any(constant_value(w_zero)):
            return "weight zero point is not 0"
        transposed = node.op == "Gemm" and bool(node.attrs.get("transB", 0))
        n_axis = 0 if transposed else 1
        if w_scale.size != 1 and (w_dq.attrs.get("axis", 1) % 2 != n_axis or "block_size" in w_dq.attrs):
            return "weight scale is not per output channel"
        a_q = a_dq.inputs[0].inputs[0] if a_dq.inputs[0].inputs else None
        if a_q is None or a_q.op != "QuantizeLinear":
            return "activation DequantizeLinear is not fed by a QuantizeLinear"
        a_zero = _optional_input(a_q, 2)
        if a_zero is not None and (constant_value(a_zero) is None or np.any(constant_value(a_zero))):
            return "activation zero point is not 0"
        if not _same_constant(a_q.inputs[1], a_dq.inputs[1]):
            return "activation Q and DQ scales differ"
        q_dtype = constant_value(a_zero).dtype if a_zero is not None else \
            (np.int8 if a_q.attrs.get("output_dtype", 2) == 3 else np.uint8)
        if q_dtype != np.int8:
            return "activation is not quantized to symmetric int8"
        scale = a_q.inputs[1]
        if constant_value(scale) is not None:
            if constant_value(scale).size != 1:
                return "activation scale is neither per-tensor nor per-token"
        elif "block_size" in a_q.attrs and a_q.attrs["block_size"] < weight.shape[1 if transposed else 0]:
            return "activation blocks are smaller than a row"
        w_kn = weight.T if transposed else weight
        return a_q, np.ascontiguousarray(w_kn), w_scale.reshape(-1).astype(np.float32), transposed

    @staticmethod
    def _uint8_activation(graph: gs.Graph, a_q: gs.Node) -> tuple[gs.Variable, gs.Tensor | None]:
        """Xq_u8 = Q(X) + 128 as uint8, and the per-token scale tensor (None for per-tensor static)."""
        x, scale = a_q.inputs[0], a_q.inputs[1]
        prefix = f"{x.name}/u8"
        xq = gs.Variable(f"{prefix}/quantized", dtype=np.uint8, shape=x.shape)
        shift = np.array(_UINT8_SHIFT, np.uint8)
        if constant_value(scale) is not None:  # per-tensor static: a plain QuantizeLinear to uint8
            graph.nodes.append(gs.Node("QuantizeLinear", f"{prefix}/QuantizeLinear",
                                       inputs=[x, scale, gs.Constant(f"{prefix}/zero_point", shift)], outputs=[xq]))
            return xq, None
        # Per-token: the same blocked QuantizeLinear, to uint8 with zero point 128 in every block.
        # |x / s| <= 127, so round(x / s) + 128 lies in [1, 255]: the same integers shifted by 128.
        scale_shape, zero_point = (gs.Variable(f"{prefix}/{n}") for n in ("scale_shape", "zero_point"))
        zero_point.dtype = np.uint8
        graph.nodes += [
            gs.Node("Shape", f"{prefix}/Shape", inputs=[scale], outputs=[scale_shape]),
            gs.Node("Expand", f"{prefix}/Expand", inputs=[gs.Constant(f"{prefix}/shift", shift), scale_shape],
                    outputs=[zero_point]),
            gs.Node("QuantizeLinear", f"{prefix}/QuantizeLinear", attrs={k: v for k, v in a_q.attrs.items()
                                                                        if k in ("axis", "block_size")},
                    inputs=[x, scale, zero_point], outputs=[xq]),
        ]
        return xq, scale

    @staticmethod
    def _rewrite_gemm(graph, node, a_q, xq_u8, row_scale, weight_int8, weight_scale, transposed) -> None:
        name = node.name or node.outputs[0].name
        a_scale = a_q.inputs[1] if row_scale is None else gs.Constant(f"{name}/unit_scale", np.array(1.0, np.float32))
        inputs = [xq_u8, gs.Constant(f"{name}/weight_int8", weight_int8), a_scale,
                  gs.Constant(f"{name}/weight_scale", weight_scale),
                  gs.Constant(f"{name}/act_zero_point", np.array(_UINT8_SHIFT, np.uint8))]
        bias = _optional_input(node, 2) if node.op == "Gemm" else None
        out = node.outputs[0]
        node.outputs.clear()
        if row_scale is None:
            if bias is not None:
                inputs += [gs.Constant(f"{name}/no_weight_zero_point", np.zeros((), np.int8)), bias]
            graph.nodes.append(gs.Node("MatMulIntegerToFloat", f"{name}/int8", inputs=inputs, outputs=[out],
                                       domain="com.microsoft"))
            return
        product = gs.Variable(f"{name}/int8_product", dtype=np.float32)
        graph.nodes.append(gs.Node("MatMulIntegerToFloat", f"{name}/int8", inputs=inputs, outputs=[product],
                                   domain="com.microsoft"))
        if bias is None:
            graph.nodes.append(gs.Node("Mul", f"{name}/row_scale", inputs=[product, row_scale], outputs=[out]))
            return
        scaled = gs.Variable(f"{name}/row_scaled", dtype=np.float32)
        graph.nodes += [gs.Node("Mul", f"{name}/row_scale", inputs=[product, row_scale], outputs=[scaled]),
                        gs.Node("Add", f"{name}/bias", inputs=[scaled, bias], outputs=[out])]
