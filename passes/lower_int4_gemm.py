"""Lowers ``com.microsoft.MatMulNBits`` (bits=4) to ``qcompiler::Int4Gemm`` for the TensorRT backend.

Cases handled: MatMulNBits with constant B / scales (and constant uint8 zero points, if any), any
block_size the kernel takes (16..256, power of two) and an optional bias (input 5). The packed layout
of the two ops is the same (``qcompiler.plugins.ops.INT4_LAYOUT``), so the lowering is a rename and
the weights are shared, not copied: ``Y = X @ ((q - zp) * scale)^T + bias`` on both sides.

Declined (reason in ``not_fired``): bits != 4; a non-constant weight/scale/zero point (a dynamic weight
cannot be embedded in a plugin); zero points stored as floats (MatMulNBits allows them, Int4Gemm does
not); a non-empty ``g_idx`` (act-order permutation; GPTQ with act_order must reorder at export).
"""

from __future__ import annotations

import logging

import onnx_graphsurgeon as gs

from qcompiler.graph import add_domain, constant_value
from qcompiler.pass_manager import PassContext, PassResult
from qcompiler.plugins.ops import DOMAIN, INT4_GEMM, validate_attributes

__all__ = ["LowerInt4Gemm"]

logger = logging.getLogger(__name__)


def _present(node: gs.Node, i: int) -> gs.Tensor | None:
    if len(node.inputs) <= i or node.inputs[i].name == "":
        return None
    return node.inputs[i]


class LowerInt4Gemm:
    """MatMulNBits(bits=4) -> qcompiler::Int4Gemm (no configuration)."""

    name = "lower_int4_gemm"

    def run(self, graph: gs.Graph, context: PassContext) -> PassResult:
        lowered, not_fired = [], []
        for node in list(graph.nodes):
            if node.op != "MatMulNBits" or node.domain != "com.microsoft":
                continue
            reason = self._check(node)
            if reason:
                not_fired.append((node.name, reason))
                continue
            if context.is_excluded(node.name):
                not_fired.append((node.name, "excluded by the user"))
                continue
            attrs = {"K": int(node.attrs["K"]), "N": int(node.attrs["N"]), "block_size": int(node.attrs["block_size"]),
                     "bits": 4}
            validate_attributes(INT4_GEMM, attrs, node.name)
            empty = gs.Variable.empty()
            inputs = [node.inputs[0], node.inputs[1], node.inputs[2],
                      _present(node, 3) or empty, _present(node, 5) or empty]
            while inputs and inputs[-1].name == "":  # trailing optional inputs are simply left out
                inputs.pop()
            new = gs.Node(op=INT4_GEMM, name=f"{node.name}_int4gemm" if node.name else "", domain=DOMAIN,
                          attrs=attrs, inputs=inputs, outputs=list(node.outputs))
            node.outputs.clear()
            node.inputs.clear()
            graph.nodes.append(new)
            lowered.append({"node": node.name, "N": attrs["N"], "K": attrs["K"], "block_size": attrs["block_size"]})
        if lowered:
            add_domain(graph, DOMAIN)
            graph.cleanup()
        return PassResult(changed=bool(lowered), summary=f"lowered {len(lowered)} MatMulNBits to {DOMAIN}::{INT4_GEMM}",
                          details=lowered, not_fired=not_fired)

    @staticmethod
    def _check(node: gs.Node) -> str:
        if int(node.attrs.get("bits", 4)) != 4:
            return f"bits={node.attrs.get('bits')} (only 4-bit weights have a kernel)"
        for key in ("K", "N", "block_size"):
            if key not in node.attrs:
                return f"missing attribute {key}"
        if constant_value(node.inputs[1]) is None or constant_value(node.inputs[2]) is None:
            return "weight or scales are not constant initializers"
        bs = int(node.attrs["block_size"])
        if not (16 <= bs <= 256 and bs & (bs - 1) == 0):
            return f"block_size {bs} not supported by the kernel (16..256, power of two)"
        zp = _present(node, 3)
        if zp is not None:
            value = constant_value(zp)
            if value is None:
                return "zero points are not constant"
            if value.dtype.name != "uint8":
                return f"zero points are {value.dtype} (Int4Gemm takes packed uint8 zero points)"
        g_idx = _present(node, 4)
        if g_idx is not None:
            return "g_idx (act-order group index) is present; reorder the weight at export instead"
        return ""
