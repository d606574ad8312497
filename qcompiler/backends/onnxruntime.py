"""ONNX Runtime backend: the embedded default. Sessions, runs and latency on the CPU provider."""

from __future__ import annotations

import logging
import os
import statistics
import time
from pathlib import Path

import numpy as np

__all__ = ["create_session", "measure_latency", "optimized_op_types"]

logger = logging.getLogger(__name__)


def create_session(model_path: str | Path, threads: int | None = None, optimized_path: str | Path | None = None):
    """A CPU session with all graph optimizations, ``threads`` intra-op threads and one inter-op thread."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or os.cpu_count() or 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])


def measure_latency(session, feed: dict[str, np.ndarray], *, warmup: int = 2, repeats: int = 10) -> float:
    """Median wall time of ``session.run`` in milliseconds."""
    for _ in range(warmup):
        session.run(None, feed)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def optimized_op_types(model_path: str | Path, workdir: str | Path) -> dict[str, int]:
    """Counts of the op types ONNX Runtime actually runs after its own graph optimizations."""
    import onnx

    target = Path(workdir) / (Path(model_path).stem + ".ort_optimized.onnx")
    create_session(model_path, threads=1, optimized_path=target)
    counts: dict[str, int] = {}
    for node in onnx.load(str(target), load_external_data=False).graph.node:
        key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
        counts[key] = counts.get(key, 0) + 1
    return counts
