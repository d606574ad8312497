"""Calibrate: (re)collect activation statistics for the GEMM inputs of the graph as it is now.

A pipeline step rather than a rewrite: passes that change activations (SmoothQuant divides them by s)
make earlier statistics stale for later passes (static ranges, outlier columns). It reads the graph,
runs the calibration data, and replaces ``context.stats``; the graph is untouched.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from qcompiler.calibration import collect_stats
from qcompiler.graph import export_graph, weighted_gemms
from qcompiler.pass_manager import PassContext, PassResult

__all__ = ["Calibrate"]


class Calibrate:
    """Collects statistics of every constant-weight GEMM's input.

    Args:
        outlier_threshold: |x| above which a token counts as an outlier for its channel.
        bins: histogram bins for percentile ranges.
        relative_outlier_threshold: if set, also count tokens with |x_j| > this multiple of the token's RMS.
    """

    name = "calibrate"
    exact = True

    def __init__(self, outlier_threshold: float = 6.0, bins: int = 2048,
                 relative_outlier_threshold: float | None = None):
        self.outlier_threshold = outlier_threshold
        self.bins = bins
        self.relative_outlier_threshold = relative_outlier_threshold

    def run(self, graph: gs.Graph, context: PassContext) -> PassResult:
        if context.calibration_feeds is None:
            raise ValueError("this recipe needs calibration data (--calib or --calib-text), or saved --stats")
        names = [g.activation.name for g in weighted_gemms(graph)]
        context.stats = collect_stats(export_graph(graph), names, context.calibration_feeds, bins=self.bins,
                                      outlier_threshold=self.outlier_threshold,
                                      relative_outlier_threshold=self.relative_outlier_threshold,
                                      show_progress=context.show_progress)
        return PassResult(changed=False, summary=f"statistics of {len(context.stats.tensors)} GEMM inputs")
