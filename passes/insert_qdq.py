"""InsertQDQ: W8A8 QuantizeLinear/DequantizeLinear pairs in front of constant-weight GEMMs.

Placement follows TensorRT's rules: quantize the *inputs* of weighted ops (activation and weight),
never their outputs, so every DQ feeds the GEMM directly and a backend can fuse Q/DQ into an int8 GEMM.

* Weight W [K, N]: int8 symmetric, one scale per output channel,
  s_n = max_k |W_kn| / 127 (axis 1 for MatMul; axis 0 for Gemm's transposed [N, K]).
* Activation X, symmetric int8 with zero point 0, either
  - per-tensor static: s = max|X| / 127 (or a percentile of |X|) from calibration, or
  - per-token dynamic: s_t = max_k |X_tk| / 127 computed in the graph (ReduceMax/ReduceMin, Div) and
    applied with a blocked QuantizeLinear (block_size = K along the last axis, opset 21), so every row
    has its own scale.
  GEMMs reading one activation share one quantizer.

Skipped (each reported): K or N below ``min_gemm_dim`` (tiny GEMMs/GEMVs lose more than they gain),
the GEMM producing a graph output (the LM head) unless enabled, shared weights, excluded or
keep-float nodes, and activations known to have a single row (GEMV). Attention BMMs, norms and
Softmax are not weighted GEMMs and stay in float.
"""

from __future__ import annotations

import logging
import re

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from qcompiler.algorithms.int8 import INT8_MAX, quantize_weight_per_channel, symmetric_scale
from qcompiler.calibration import CalibrationStats
from qcompiler.config import ActivationScheme, RangeMethod, W8A8Config
from qcompiler.graph import KEEP_FLOAT_SUFFIX, WeightedGemm, ensure_opset, weighted_gemms
from qcompiler.pass_manager import PassContext, PassResult

__all__ = ["InsertQDQ", "eligible_w8a8_gemms"]

logger = logging.getLogger(__name__)

# Floor for dynamic scales: an all-zero row would otherwise divide by zero.
_MIN_DYNAMIC_SCALE = 1e-12


def eligible_w8a8_gemms(graph: gs.Graph, config: W8A8Config, context: PassContext
                        ) -> tuple[list[WeightedGemm], list[tuple[str, str]]]:
    """The GEMMs the W8A8 rules select, and (name, reason) for each one they do not."""
    include = re.compile(config.include_regex) if config.include_regex else None
    exclude = re.compile(config.exclude_regex) if config.exclude_regex else None
    chosen, skipped = [], []
    for gemm in weighted_gemms(graph, config.op_types):
        name = gemm.node.name or gemm.node.outputs[0].name
        rows = gemm.activation.shape[:-1] if gemm.activation.shape else None
        if name.endswith(KEEP_FLOAT_SUFFIX):
            reason = "kept in float on purpose (outlier columns)"
        elif context.is_excluded(name) or (exclude and exclude.search(name)):
            reason = "excluded by name"
        elif include and not include.search(name):
            reason = "not matched by include_regex"
        elif gemm.k < config.min_gemm_dim or gemm.n < config.min_gemm_dim:
            reason = f"tiny GEMM (K={gemm.k}, N={gemm.n} < {config.min_gemm_dim})"
        elif rows and all(isinstance(d, int) for d in rows) and int(np.prod(rows)) == 1:
            reason = "GEMV (a single activation row)"
        elif gemm.produces_graph_output and not config.quantize_lm_head:
            reason = "produces a graph output (LM head); enable quantize_lm_head to include it"
        elif gemm.weight_is_shared:
            reason = "weight shared with other nodes"
        else:
            chosen.append(gemm)
            continue
        skipped.append((name, reason))
    return chosen, skipped


class InsertQDQ:
    """Inserts W8A8 Q/DQ pairs; per-tensor static scales come from ``context.stats``.

    Args:
        config: activation scheme, range method, selection rules.
    """

    name = "insert_qdq"

    def __init__(self, config: W8A8Config | None = None):
        self.config = config or W8A8Config()

    def run(self, graph: gs.Graph, context: PassContext) -> PassResult:
        gemms, skipped = eligible_w8a8_gemms(graph, self.config, context)
        result = PassResult(changed=False, not_fired=list(skipped))
        static = self.config.activation == ActivationScheme.PER_TENSOR_STATIC
        stats: CalibrationStats | None = context.stats
        if static and stats is None:
            raise ValueError("per-tensor static activation scales need calibration statistics")
        ensure_opset(graph, 21 if not static else 13,
                     "per-token int8 activations use blocked QuantizeLinear (opset 21)" if not static
                     else "per-channel QuantizeLinear needs opset 13")
        quantized_inputs: dict[str, gs.Variable] = {}
        for gemm in gemms:
            name = gemm.node.name or gemm.node.outputs[0].name
            x = gemm.activation
            if static and x.name not in stats:
                result.not_fired.append((name, f"no calibration range for {x.name}"))
                continue
            if x.name not in quantized_inputs:
                quantized_inputs[x.name] = (self._static_qdq(graph, x, stats) if static
                                            else self._dynamic_qdq(graph, x, gemm.k))
            gemm.node.inputs[0] = quantized_inputs[x.name]
            gemm.node.inputs[1] = self._weight_qdq(graph, gemm)
            result.changed = True
            result.details.append({"node": name, "k": gemm.k, "n": gemm.n, "activation": x.name,
                                   "scheme": self.config.activation.value})
        result.summary = (f"quantized {len(result.details)} GEMMs W8A8 ({self.config.activation.value}); "
                          f"{len(result.not_fired)} left in float")
        return result

    def _activation_range(self, stats: CalibrationStats, name: str) -> float:
        tensor_stats = stats[name]
        if self.config.range_method == RangeMethod.PERCENTILE:
            return tensor_stats.percentile_absmax(self.config.percentile)
        return tensor_stats.absmax

    def _static_qdq(self, graph: gs.Graph, x: gs.Variable, stats: CalibrationStats) -> gs.Variable:
        scale = gs.Constant(f"{x.name}/act_scale", symmetric_scale(self._activation_range(stats, x.name)))
        zero = gs.Constant(f"{x.name}/act_zero_point", np.zeros((), np.int8))
        q = gs.Variable(f"{x.name}/quantized", dtype=np.int8, shape=x.shape)
        dq = gs.Variable(f"{x.name}/dequantized", dtype=np.float32, shape=x.shape)
        graph.nodes += [gs.Node("QuantizeLinear", f"{x.name}/QuantizeLinear", inputs=[x, scale, zero], outputs=[q]),
                        gs.Node("DequantizeLinear", f"{x.name}/DequantizeLinear", inputs=[q, scale, zero], outputs=[dq])]
        return dq

    def _dynamic_qdq(self, graph: gs.Graph, x: gs.Variable, k: int) -> gs.Variable:
        # max|x| per row as max(ReduceMax(x), -ReduceMin(x)): two reductions, no full-size Abs pass.
        prefix = f"{x.name}/per_token"
        rowmax, rowmin, negmin, absmax, scale_raw, scale = (
            gs.Variable(f"{prefix}/{n}", dtype=np.float32)
            for n in ("rowmax", "rowmin", "negmin", "absmax", "scale_raw", "scale"))
        q = gs.Variable(f"{prefix}/quantized", dtype=np.int8, shape=x.shape)
        dq = gs.Variable(f"{prefix}/dequantized", dtype=np.float32, shape=x.shape)
        axes = gs.Constant(f"{prefix}/axes", np.array([-1], np.int64))
        qmax = gs.Constant(f"{prefix}/qmax", np.array(INT8_MAX, np.float32))
        floor = gs.Constant(f"{prefix}/min_scale", np.array(_MIN_DYNAMIC_SCALE, np.float32))
        blocked = {"axis": -1, "block_size": k}
        graph.nodes += [
            gs.Node("ReduceMax", f"{prefix}/ReduceMax", attrs={"keepdims": 1}, inputs=[x, axes], outputs=[rowmax]),
            gs.Node("ReduceMin", f"{prefix}/ReduceMin", attrs={"keepdims": 1}, inputs=[x, axes], outputs=[rowmin]),
            gs.Node("Neg", f"{prefix}/Neg", inputs=[rowmin], outputs=[negmin]),
            gs.Node("Max", f"{prefix}/AbsMax", inputs=[rowmax, negmin], outputs=[absmax]),
            gs.Node("Div", f"{prefix}/Div", inputs=[absmax, qmax], outputs=[scale_raw]),
            gs.Node("Max", f"{prefix}/Max", inputs=[scale_raw, floor], outputs=[scale]),
            gs.Node("QuantizeLinear", f"{prefix}/QuantizeLinear",
                    attrs={**blocked, "output_dtype": onnx.TensorProto.INT8}, inputs=[x, scale], outputs=[q]),
            gs.Node("DequantizeLinear", f"{prefix}/DequantizeLinear", attrs=blocked, inputs=[q, scale], outputs=[dq]),
        ]
        return dq

    def _weight_qdq(self, graph: gs.Graph, gemm: WeightedGemm) -> gs.Variable:
        w = gemm.weight
        _, scale_n = quantize_weight_per_channel(gemm.weight_kn.astype(np.float32))
        axis = 0 if gemm.transposed else 1
        scale = gs.Constant(f"{w.name}/weight_scale", scale_n)
        zero = gs.Constant(f"{w.name}/weight_zero_point", np.zeros(scale_n.shape, np.int8))
        q = gs.Variable(f"{w.name}/quantized", dtype=np.int8, shape=list(w.shape))
        dq = gs.Variable(f"{w.name}/dequantized", dtype=np.float32, shape=list(w.shape))
        graph.nodes += [
            gs.Node("QuantizeLinear", f"{w.name}/QuantizeLinear", attrs={"axis": axis}, inputs=[w, scale, zero], outputs=[q]),
            gs.Node("DequantizeLinear", f"{w.name}/DequantizeLinear", attrs={"axis": axis}, inputs=[q, scale, zero], outputs=[dq]),
        ]
        return dq
