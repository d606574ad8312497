"""GPTQ: weight-only quantization with second-order error feedback (Frantar et al. 2022).

For every selected MatMul/Gemm (rules in ``qcompiler.passes.lower_weight_only``) with weight
W ∈ R^{N×K} (output × input channels) and calibration inputs X, GPTQ chooses grid values Q that
minimise the layer-output error ‖W X − Q X‖² column by column, each column's rounding error being
compensated by the columns not yet quantized through H = 2 X Xᵀ / n (the math, with act-order, static
groups, damping and lazy block updates, is ``qcompiler.algorithms.gptq.gptq_quantize``).

Sequential, as in the paper: the Hessian of a GEMM comes from inputs computed through the *already
quantized* GEMMs before it, so later layers compensate earlier layers' error. Stages come from the
graph's topology and activations are streamed (``qcompiler.sequential``): only the current stage's
Hessians and the tensors crossing the current cut are in memory. GEMMs of one stage that read the
same activation (q/k/v, gate/up) share one H and are solved together as one stacked W (rows are
independent given H, so this equals solving them one by one).

The result is lowered exactly like RTN's (same grid, same packing), as ``config.lowering`` says.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs
import torch

from qcompiler.algorithms.gptq import gptq_quantize
from qcompiler.algorithms.weight_quant import QuantizedWeight
from qcompiler.config import GPTQConfig
from qcompiler.errors import CalibrationDataError
from qcompiler.pass_manager import PassContext, PassResult
from qcompiler.passes.lower_weight_only import (
    fake_quant_weight,
    lower_weight_only,
    prepare_lowering,
    select_weight_only_gemms,
    weight_array,
)
from qcompiler.sequential import Stage, gemm_key, run_sequential

__all__ = ["GPTQ"]

logger = logging.getLogger(__name__)


class GPTQ:
    """Sequential GPTQ over the graph's constant-weight GEMMs; needs ``context.calibration_feeds``.

    Args:
        config: bits, group size, symmetry, act-order, damping, block size, lowering, selection rules.
    """

    name = "gptq"

    def __init__(self, config: GPTQConfig | None = None):
        self.config = config if config is not None else GPTQConfig()

    def run(self, graph: gs.Graph, context: PassContext) -> PassResult:
        gemms, skipped = select_weight_only_gemms(graph, self.config, context)
        result = PassResult(changed=False, not_fired=list(skipped))
        if not gemms:
            result.summary = "no GEMM to quantize"
            return result
        if context.calibration_feeds is None:
            raise CalibrationDataError("GPTQ needs calibration data (--calib or --calib-text)")
        by_key = {gemm_key(g): g for g in gemms}
        quantized: dict[str, QuantizedWeight] = {}
        solve_info: dict[str, dict] = {}
        cfg = self.config

        def quantize_stage(stage: Stage, hessians: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
            replaced = {}
            for activation, keys in stage.groups.items():
                members = [by_key[k] for k in keys]
                weights = [weight_array(g) for g in members]  # [K, N_i] each
                stacked = np.concatenate([w.T for w in weights], axis=0)  # [Σ N_i, K]
                dtype = weights[0].dtype
                del weights
                solved = gptq_quantize(torch.from_numpy(np.ascontiguousarray(stacked, np.float32)),
                                       hessians[activation], bits=cfg.bits, group_size=cfg.group_size,
                                       symmetric=cfg.symmetric, act_order=cfg.act_order, damp=cfg.damp,
                                       block_size=cfg.block_size, scale_dtype=dtype)
                del stacked
                row = 0
                for gemm in members:
                    n = gemm.weight.shape[0] if gemm.transposed else gemm.weight.shape[1]
                    rows = slice(row, row + n)
                    row += n
                    codes = solved.codes[rows].T.numpy()
                    q = QuantizedWeight(
                        codes=codes.astype(np.int8 if cfg.symmetric else np.uint8),
                        scales=np.ascontiguousarray(solved.scales[rows].T.numpy().astype(dtype)),
                        zero_points=None if solved.zeros is None else
                        np.ascontiguousarray(solved.zeros[rows].T.numpy().astype(np.uint8)),
                        bits=cfg.bits, group_size=cfg.group_size)
                    key = gemm_key(gemm)
                    quantized[key] = q
                    solve_info[key] = {"stage": stage.index, "hessian_of": activation, "shared_with": len(members),
                                       "loss": solved.loss, "damp": solved.damp}
                    replaced[key] = fake_quant_weight(gemm, q)
            return replaced

        report = run_sequential(graph, gemms, context.calibration_feeds, quantize_stage,
                                show_progress=context.show_progress)
        prepare_lowering(graph, cfg)
        for gemm in gemms:
            key = gemm_key(gemm)
            if key not in quantized:
                result.not_fired.append((key, "its input was never computed from the calibration data"))
                continue
            detail = lower_weight_only(graph, gemm, quantized.pop(key), cfg)
            detail.update(solve_info[key])
            result.details.append(detail)
            result.changed = True
        group = f"g{cfg.group_size}" if cfg.group_size else "per-channel"
        result.summary = (
            f"GPTQ {cfg.bits}-bit {group} {'sym' if cfg.symmetric else 'asym'}"
            f"{' act-order' if cfg.act_order else ''}: {len(result.details)} GEMMs in {report.stages} stages "
            f"over {report.batches} batches as {cfg.lowering.value}; {len(result.not_fired)} left in float "
            f"(forward {report.seconds['forward']:.1f}s, hessian {report.seconds['hessian']:.1f}s, "
            f"solve {report.seconds['quantize']:.1f}s, peak cache {report.peak_cache_bytes / 2**20:.0f} MiB)")
        return result
