"""Small utilities shared by the tests: run a model in ONNX Runtime, gather statistics, SQNR."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort

from qcompiler.calibration import CalibrationStats, collect_stats, iterate_feeds
from qcompiler.graph import import_graph, weighted_gemms


def run_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray], optimize: bool = False) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def gemm_input_stats(model: onnx.ModelProto, arrays: dict[str, np.ndarray], threshold: float = 6.0,
                     relative_threshold: float | None = None) -> CalibrationStats:
    names = [g.activation.name for g in weighted_gemms(import_graph(model))]
    return collect_stats(model, names, iterate_feeds(arrays, batch=1), outlier_threshold=threshold,
                         relative_outlier_threshold=relative_threshold)


def sqnr_db(reference: np.ndarray, approximation: np.ndarray) -> float:
    noise = np.linalg.norm(reference.astype(np.float64) - approximation)
    return float("inf") if noise == 0 else float(20 * np.log10(np.linalg.norm(reference) / noise))
