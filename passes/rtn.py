"""WeightOnlyRTN: weight-only quantization by round-to-nearest, the baseline GPTQ must beat.

For every selected MatMul/Gemm (rules in ``qcompiler.passes.lower_weight_only``), the weight
W [K, N] is put on a b-bit grid with one scale (and, asymmetric, one zero point) per group of
``group_size`` input channels and output channel, by rounding each weight to the nearest grid point:

    ŵ = s · (clamp(round(w / s) + z, q_min, q_max) − z)         (grid: ``qcompiler.algorithms.weight_quant``)

It needs no calibration data. The lowered graph computes X · Ŵ exactly (with MatMulNBits'
accuracy_level 0; level 4 also quantizes X to int8 blocks inside ORT).
"""

from __future__ import annotations

import logging

import onnx_graphsurgeon as gs

from qcompiler.algorithms.weight_quant import quantize_rtn
from qcompiler.config import WeightOnlyConfig
from qcompiler.pass_manager import PassContext, PassResult
from qcompiler.passes.lower_weight_only import (
    lower_weight_only,
    prepare_lowering,
    select_weight_only_gemms,
    weight_array,
)

__all__ = ["WeightOnlyRTN"]

logger = logging.getLogger(__name__)


class WeightOnlyRTN:
    """Round-to-nearest weight-only quantization, lowered as ``config.lowering`` says.

    Args:
        config: bits, group size, symmetry, lowering and selection rules.
    """

    name = "weight_only_rtn"

    def __init__(self, config: WeightOnlyConfig | None = None):
        self.config = config if config is not None else WeightOnlyConfig()

    def run(self, graph: gs.Graph, context: PassContext) -> PassResult:
        gemms, skipped = select_weight_only_gemms(graph, self.config, context)
        result = PassResult(changed=False, not_fired=list(skipped))
        if gemms:
            prepare_lowering(graph, self.config)
        for gemm in gemms:
            quantized = quantize_rtn(weight_array(gemm), self.config.bits, self.config.group_size,
                                     self.config.symmetric)
            result.details.append(lower_weight_only(graph, gemm, quantized, self.config))
            result.changed = True
        group = f"g{self.config.group_size}" if self.config.group_size else "per-channel"
        result.summary = (f"RTN {self.config.bits}-bit {group} {'sym' if self.config.symmetric else 'asym'}: "
                          f"{len(result.details)} GEMMs as {self.config.lowering.value}; "
                          f"{len(result.not_fired)} left in float")
        return result
