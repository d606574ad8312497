"""Runs a literal list of passes over an onnx-graphsurgeon graph, timing and logging each.

A pass is any object with a ``name`` attribute and a ``run(graph, context) -> PassResult`` method.
Passes get everything they need through their constructor (configuration) and the
:class:`PassContext` (calibration statistics and a calibration-data source); they keep no state
between calls.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import onnx_graphsurgeon as gs

__all__ = ["PassContext", "PassResult", "GraphPass", "PassManager", "PassRecord"]

logger = logging.getLogger(__name__)


@dataclass
class PassResult:
    """What a pass did.

    Attributes:
        changed: whether the graph was modified.
        summary: one line for the log and the report ("smoothed 210 MatMuls in 60 groups").
        details: per-item facts for the report (JSON-serialisable dicts).
        not_fired: (node or tensor name, reason) for each candidate the pass declined; shown by --explain.
    """

    changed: bool
    summary: str = ""
    details: list[dict[str, Any]] = field(default_factory=list)
    not_fired: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class PassContext:
    """Inputs a pass may consume besides the graph.

    Attributes:
        stats: calibration statistics (``qcompiler.calibration.CalibrationStats``) or None.
        calibration_feeds: a callable returning a fresh iterator over feed dicts (input name -> array),
            for passes that must run the model themselves (SmoothQuant's alpha search, GPTQ).
        exclude: compiled regexes of node names the user excluded from quantization.
        show_progress: whether long passes may draw progress bars.
    """

    stats: Any = None
    calibration_feeds: Callable[[], Iterator[dict[str, Any]]] | None = None
    exclude: Sequence[re.Pattern[str]] = ()
    show_progress: bool = False

    def is_excluded(self, node_name: str) -> bool:
        return any(p.search(node_name or "") for p in self.exclude)


class GraphPass(Protocol):
    name: str
    # True for passes that preserve the function exactly (in exact arithmetic): SmoothQuant, Calibrate.
    exact: bool

    def run(self, graph: gs.Graph, context: PassContext) -> PassResult: ...


@dataclass
class PassRecord:
    index: int
    name: str
    seconds: float
    result: PassResult


class PassManager:
    """Applies passes in order; with ``dump_dir`` writes ``NN_name.onnx`` after each pass."""

    def __init__(self, passes: Iterable[GraphPass], dump_dir: str | Path | None = None):
        self.passes = list(passes)
        self.dump_dir = Path(dump_dir) if dump_dir else None

    def run(self, graph: gs.Graph, context: PassContext, first_index: int = 1) -> list[PassRecord]:
        from qcompiler.graph import export_graph, save_model

        records = []
        for index, graph_pass in enumerate(self.passes, start=first_index):
            start = time.perf_counter()
            result = graph_pass.run(graph, context)
            graph.cleanup().toposort()
            seconds = time.perf_counter() - start
            records.append(PassRecord(index, graph_pass.name, seconds, result))
            logger.info("pass %02d %s: %s (%.2fs)", index, graph_pass.name,
                        result.summary or ("changed" if result.changed else "no change"), seconds)
            for where, why in result.not_fired:
                logger.debug("  %s did not fire on %s: %s", graph_pass.name, where, why)
            if self.dump_dir is not None:
                self.dump_dir.mkdir(parents=True, exist_ok=True)
                save_model(export_graph(graph), self.dump_dir / f"{index:02d}_{graph_pass.name}.onnx")
        return records
