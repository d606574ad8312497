"""OutlierSplit: LLM.int8()'s mixed-precision decomposition (Dettmers et al. 2022) as a static rewrite.

A few input channels of some GEMMs carry activations far larger than the rest (|x_j| > 6 in many
tokens); one int8 scale for the whole row then wastes almost all levels on them. LLM.int8() computes
those columns in float and the rest in int8. Here the outlier columns are chosen once, from
calibration statistics, and the GEMM is rewritten with operators TensorRT parses:

    X W = Σ_j X_j W_j = (X ⊙ m) · W_I + X[..., O] · W[O, :]       (exact)

with m the 0/1 mask of inlier columns and W_I = W with its outlier rows zeroed:

        X ─┬─ Mul(m) ────────────── X ⊙ m ── MatMul/Gemm(W_I (+ bias)) ──────────────┐
           └─ Gather(axis=-1, O) ── X_O ─── MatMul(W[O, :])  "<name>/outliers::keep_float" ── Add ── Y

The inlier GEMM keeps the node's name, attributes and bias, so InsertQDQ (run after this pass)
quantizes it W8A8; the zeroed columns no longer set any token's int8 scale and the zeroed weight rows
no longer set any channel's. The outlier MatMul's name ends with ``KEEP_FLOAT_SUFFIX`` so every
quantization pass leaves it in float. The rewrite is exact up to fp32 summation order.

The inlier path masks instead of gathering X[..., I]: the int8 GEMM then runs over all K (a few
percent more MACs), but a Mul streams X at memory speed and fuses into the quantizer, while a Gather
of ~95% of the columns is a full indexed copy (ONNX Runtime CPU: ~18% of llm-int8's run time on
SmolLM2 before the change).

Outlier columns of an activation X: channels j with outlier_fraction_j = #{tokens: |x_j| > threshold}
/ #tokens >= ``min_token_fraction`` (and at least one such token), or, with a relative threshold k,
channels where |x_tj| > k · rms(x_t) in >= ``relative_min_token_fraction`` of tokens; at most
``max_float_fraction`` · K of them (the most frequent first, by the larger of the two fractions, ties
by max|x_j|). All GEMMs reading X share one split (one mask, one Gather). A GEMM whose input has no
outlier column is left alone and reported.

Statistics: ``context.stats[X]`` must have been collected with ``outlier_threshold == threshold``
(and with the config's ``relative_threshold`` when it sets one).
For each masked tensor X ⊙ m the pass adds statistics to ``context.stats`` so that static ranges
can be taken for it: its per-channel max|x| (hence its max range) and outlier counts are exact (X's,
zero on the masked channels); its histogram is X's whole histogram and min/max are X's clipped to
±max|X ⊙ m|, so a percentile range is an upper bound (at most max|X ⊙ m|), not exact.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from qcompiler.calibration import CalibrationStats, TensorStats
from qcompiler.config import OutlierSplitConfig
from qcompiler.errors import CalibrationDataError
from qcompiler.graph import KEEP_FLOAT_SUFFIX, WeightedGemm, weighted_gemms
from qcompiler.pass_manager import PassContext, PassResult

__all__ = ["OutlierSplit", "outlier_columns", "masked_stats"]

logger = logging.getLogger(__name__)


def _k(gemm: WeightedGemm) -> int:
    # From the shape, without loading the weight.
    return gemm.weight.shape[1] if gemm.transposed else gemm.weight.shape[0]


def _fractions(stats: TensorStats, config: OutlierSplitConfig) -> tuple[np.ndarray, np.ndarray]:
    """Per channel: whether a rule selects it, and the larger of its two outlier token fractions."""
    fraction = stats.outlier_fraction()
    chosen = (stats.outlier_tokens > 0) & (fraction >= config.min_token_fraction)
    if config.relative_threshold is not None:
        relative = stats.relative_outlier_fraction()
        if relative is None:
            raise CalibrationDataError("the relative outlier rule needs statistics collected with a relative threshold")
        chosen |= (stats.relative_outlier_tokens > 0) & (relative >= config.relative_min_token_fraction)
        fraction = np.maximum(fraction, relative)
    return chosen, fraction


def outlier_columns(stats: TensorStats, config: OutlierSplitConfig) -> np.ndarray:
    """Sorted indices of the channels to keep in float (see module docstring); may be empty."""
    chosen, fraction = _fractions(stats, config)
    k = fraction.size
    candidates = np.nonzero(chosen)[0]
    limit = int(np.floor(config.max_float_fraction * k))
    if candidates.size > limit:
        # Most frequent outliers first; np.lexsort sorts by its last key first.
        order = np.lexsort((-stats.channel_absmax[candidates], -fraction[candidates]))
        candidates = candidates[order[:limit]]
    return np.sort(candidates)


def masked_stats(stats: TensorStats, outliers: np.ndarray) -> TensorStats:
    """Statistics of X with the ``outliers`` channels zeroed, derivable from X's (see module docstring)."""
    def zeroed(values: np.ndarray | None) -> np.ndarray | None:
        if values is None:
            return None
        values = values.copy()
        values[outliers] = 0
        return values

    absmax = zeroed(stats.channel_absmax)
    bound = float(absmax.max()) if absmax.size else 0.0
    return TensorStats(channel_absmax=absmax, min=max(stats.min, -bound), max=min(stats.max, bound),
                       histogram=stats.histogram.copy(), outlier_tokens=zeroed(stats.outlier_tokens),
                       tokens=stats.tokens, outlier_threshold=stats.outlier_threshold,
                       relative_outlier_tokens=zeroed(stats.relative_outlier_tokens),
                       relative_threshold=stats.relative_threshold)


class OutlierSplit:
    """Splits calibrated outlier input columns of weighted GEMMs off into a float MatMul.

    Args:
        config: threshold, minimum token fraction, maximum fraction of columns kept in float.
        quantize_lm_head: also split the GEMM producing a graph output (only useful when the W8A8
            pass quantizes the LM head too).
        min_gemm_dim: GEMMs with K or N below this are not split (W8A8 leaves them in float anyway).
    """

    name = "outlier_split"
    exact = True

    def __init__(self, config: OutlierSplitConfig | None = None, *, quantize_lm_head: bool = False,
                 min_gemm_dim: int = 16):
        self.config = config if config is not None else OutlierSplitConfig()
        self.quantize_lm_head = quantize_lm_head
        self.min_gemm_dim = min_gemm_dim

    def _skip_reason(self, gemm: WeightedGemm, context: PassContext) -> str | None:
        name = gemm.node.name or gemm.node.outputs[0].name
        k, n = _k(gemm), gemm.weight.shape[0 if gemm.transposed else 1]
        if name.endswith(KEEP_FLOAT_SUFFIX):
            return "already kept in float"
        if context.is_excluded(name):
            return "excluded by name"
        if k < self.min_gemm_dim or n < self.min_gemm_dim:
            return f"tiny GEMM (K={k}, N={n} < {self.min_gemm_dim})"
        if gemm.produces_graph_output and not self.quantize_lm_head:
            return "produces a graph output (LM head), which W8A8 leaves in float"
        return None

    def run(self, graph: gs.Graph, context: PassContext) -> PassResult:
        stats: CalibrationStats | None = context.stats
        if stats is None:
            raise ValueError("OutlierSplit needs calibration statistics of the GEMM inputs")
        result = PassResult(changed=False)
        splits: dict[str, tuple[gs.Variable | None, gs.Variable | None, np.ndarray]] = {}
        total_float = 0
        for gemm in weighted_gemms(graph):
            name = gemm.node.name or gemm.node.outputs[0].name
            reason = self._skip_reason(gemm, context)
            x = gemm.activation
            x_stats = stats.get(x.name)
            if reason is None and x_stats is None:
                reason = f"no calibration statistics for its input {x.name}"
            elif reason is None and x_stats.channel_absmax.size != _k(gemm):
                reason = (f"statistics of {x.name} have {x_stats.channel_absmax.size} channels, "
                          f"the GEMM has K={_k(gemm)}")
            if reason is not None:
                result.not_fired.append((name, reason))
                continue
            if not np.isclose(x_stats.outlier_threshold, self.config.threshold):
                raise CalibrationDataError(
                    f"statistics of {x.name} count outliers above {x_stats.outlier_threshold:g}, the recipe's "
                    f"threshold is {self.config.threshold:g}; collect statistics with the recipe's threshold")
            wanted = self.config.relative_threshold
            if wanted is not None and (x_stats.relative_threshold is None
                                       or not np.isclose(x_stats.relative_threshold, wanted)):
                raise CalibrationDataError(
                    f"statistics of {x.name} count no outliers relative to the token RMS at {wanted:g}x; "
                    f"collect statistics with the recipe's relative_threshold")
            if x.name not in splits:
                outliers = outlier_columns(x_stats, self.config)
                splits[x.name] = self._split_input(graph, x, outliers, _k(gemm), np.dtype(gemm.weight.dtype)) + (outliers,)
                if 0 < outliers.size < _k(gemm):
                    stats.tensors[splits[x.name][0].name] = masked_stats(x_stats, outliers)
            x_in, x_out, outliers = splits[x.name]
            if outliers.size == 0:
                result.not_fired.append((name, f"no outlier column ({self._rule()})"))
                continue
            if outliers.size == _k(gemm):
                result.not_fired.append((name, "every column is an outlier; nothing left to quantize"))
                continue
            self._split(graph, gemm, x_in, x_out, outliers)
            total_float += outliers.size
            result.changed = True
            fraction = _fractions(x_stats, self.config)[1][outliers]
            result.details.append({"node": name, "activation": x.name, "k": _k(gemm),
                                   "float_columns": int(outliers.size), "columns": outliers.tolist()[:32],
                                   "max_outlier_fraction": float(fraction.max())})
        # Masks and Gathers of activations that ended up unused are removed by the pass manager's cleanup.
        result.summary = (f"split {len(result.details)} GEMMs; {total_float} input columns kept in float "
                          f"({self._rule()}); {len(result.not_fired)} not split")
        return result

    def _rule(self) -> str:
        c = self.config
        rule = f"|x| > {c.threshold:g} in >= {c.min_token_fraction:g} of tokens"
        if c.relative_threshold is not None:
            rule += f", or |x| > {c.relative_threshold:g} rms(token) in >= {c.relative_min_token_fraction:g}"
        return rule

    @staticmethod
    def _split_input(graph: gs.Graph, x: gs.Variable, outliers: np.ndarray, k: int,
                     dtype: np.dtype) -> tuple[gs.Variable | None, gs.Variable | None]:
        """X ⊙ m (inlier mask, of the GEMM's dtype) and X[..., outliers]; None where there is nothing to split."""
        if outliers.size in (0, k):
            return None, None
        mask = np.ones(k, dtype=dtype)
        mask[outliers] = 0
        masked = gs.Variable(f"{x.name}/inliers", dtype=x.dtype, shape=x.shape)
        graph.nodes.append(gs.Node("Mul", f"{x.name}/mask_outliers",
                                   inputs=[x, gs.Constant(f"{x.name}/inlier_mask", mask)], outputs=[masked]))
        shape = list(x.shape[:-1]) + [int(outliers.size)] if x.shape else None
        picked = gs.Variable(f"{x.name}/outliers", dtype=x.dtype, shape=shape)
        graph.nodes.append(gs.Node("Gather", f"{x.name}/gather_outliers", attrs={"axis": -1},
                                   inputs=[x, gs.Constant(f"{x.name}/outliers_index", outliers.astype(np.int64))],
                                   outputs=[picked]))
        return masked, picked

    @staticmethod
    def _split(graph: gs.Graph, gemm: WeightedGemm, x_in: gs.Variable, x_out: gs.Variable,
               outliers: np.ndarray) -> None:
        node = gemm.node
        name = node.name or node.outputs[0].name
        w_kn = gemm.weight_kn
        w_in = w_kn.copy()
        w_in[outliers] = 0
        y = node.outputs[0]
        y_in = gs.Variable(f"{y.name}/inliers", dtype=y.dtype, shape=y.shape)
        y_out = gs.Variable(f"{y.name}/outliers", dtype=y.dtype, shape=y.shape)
        node.inputs[0] = x_in
        node.inputs[1] = gs.Constant(f"{name}/weight_inliers", np.ascontiguousarray(w_in.T if gemm.transposed else w_in))
        node.outputs[0] = y_in
        graph.nodes.append(gs.Node("MatMul", f"{name}/outliers{KEEP_FLOAT_SUFFIX}",
                                   inputs=[x_out, gs.Constant(f"{name}/weight_outliers",
                                                              np.ascontiguousarray(w_kn[outliers]))],
                                   outputs=[y_out]))
        graph.nodes.append(gs.Node("Add", f"{name}/merge_outliers", inputs=[y_in, y_out], outputs=[y]))
