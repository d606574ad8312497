"""Sequential, memory-bounded activation capture: the inputs GPTQ needs, block by block.

GPTQ quantizes a model in order: the Hessian H = 2XXᵀ/n of a layer must come from inputs X computed
through the *already quantized* earlier layers, so each layer corrects the error its predecessors
left. This module does that for any ONNX graph, without knowing what a "transformer block" is.

Stages (from topology, not names). For every GEMM to quantize, level(g) = 1 + the highest level of
the GEMMs to quantize upstream of g's activation input (0 when none). Stage s is the set of GEMMs at
level s: their inputs depend only on GEMMs of earlier stages, which are quantized by then. In a Llama
block this gives {q, k, v}, {o}, {gate, up}, {down}; GEMMs of one stage that read the same tensor
share one Hessian (q/k/v; gate/up).

Steps (cached cut, each node run once). Let done_s be every node needed to compute the inputs of
stages 0..s. Step s runs only the nodes in done_s \\ done_{s-1} — which includes the GEMMs of stage
s-1, now with their quantized weights — as its own small ONNX Runtime model whose inputs are the
tensors crossing the cut from earlier steps (the residual stream, the previous stage's inputs, side
tensors such as RoPE tables or masks) plus the graph inputs. Its outputs are this stage's activations
and the tensors later steps need. Over all steps every node runs once per calibration batch (nodes
computed from constants only are folded into each step that needs them), so capture costs about one
forward pass of the model, not one per stage.

Memory bound. Between steps we keep, for every calibration batch, the tensors crossing the cut; a
tensor is dropped (per batch, as soon as the step that reads it last has consumed that batch) when no
later step needs it. Peak ≈ max over cuts of Σ_{crossing tensors} n_samples · bytes per sample
(for a Llama block the residual stream plus one stage input, e.g. 128 × 512 × (576 + 1536) × 4 B ≈
554 MB for SmolLM2-135M at its widest cut), plus one stage's Hessians, one batch's step
activations, and the weights of one step's ONNX Runtime session. The quantized weights that later
steps run with are held only until the step that runs their GEMM.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch

from qcompiler.algorithms.gptq import HessianAccumulator
from qcompiler.errors import CalibrationDataError
from qcompiler.graph import WeightedGemm

__all__ = ["Stage", "SequentialReport", "gemm_key", "plan_stages", "run_sequential"]

logger = logging.getLogger(__name__)


def gemm_key(gemm: WeightedGemm) -> str:
    """The name a GEMM is known by: its node name, else its first output's name."""
    return gemm.node.name or gemm.node.outputs[0].name


@dataclass(frozen=True)
class Stage:
    """GEMMs quantized together: their activation inputs depend only on earlier stages.

    Attributes:
        index: position in the sequential order.
        groups: activation tensor name -> keys (``gemm_key``) of the stage's GEMMs reading it;
            each group shares one Hessian.
    """

    index: int
    groups: dict[str, tuple[str, ...]]

    @property
    def gemms(self) -> tuple[str, ...]:
        return tuple(key for keys in self.groups.values() for key in keys)


@dataclass
class SequentialReport:
    """What ``run_sequential`` did and what it cost.

    Attributes:
        stages: number of stages.
        steps_run: steps that ran an ONNX Runtime session.
        batches: calibration batches per step.
        peak_cache_bytes: largest total size of tensors kept between steps.
        seconds: wall time by phase ("forward", "hessian", "quantize", "build").
    """

    stages: int = 0
    steps_run: int = 0
    batches: int = 0
    peak_cache_bytes: int = 0
    seconds: dict[str, float] = field(default_factory=lambda: {"forward": 0.0, "hessian": 0.0,
                                                                "quantize": 0.0, "build": 0.0})


def _subgraph_outer_inputs(node: gs.Node) -> list[gs.Tensor]:
    """Tensors a node's subgraph attributes (If/Loop/Scan bodies) read from the enclosing scope."""
    found: dict[str, gs.Tensor] = {}

    def visit(graph: gs.Graph) -> None:
        local = {t.name for t in graph.inputs} | {t.name for n in graph.nodes for t in n.outputs}
        for inner in graph.nodes:
            for tensor in inner.inputs:
                if tensor.name and tensor.name not in local:
                    found.setdefault(tensor.name, tensor)
            for value in inner.attrs.values():
                if isinstance(value, gs.Graph):
                    visit(value)

    for value in node.attrs.values():
        if isinstance(value, gs.Graph):
            visit(value)
    return list(found.values())


def _node_inputs(node: gs.Node) -> list[gs.Tensor]:
    return [t for t in node.inputs if t.name] + _subgraph_outer_inputs(node)


class _Topology:
    """Producer/consumer maps and a topological order of a graph, computed without modifying it."""

    def __init__(self, graph: gs.Graph):
        self.graph_inputs = {t.name for t in graph.inputs}
        self.producer: dict[str, gs.Node] = {}
        for node in graph.nodes:
            for out in node.outputs:
                self.producer[out.name] = node
        self.inputs = {id(n): _node_inputs(n) for n in graph.nodes}
        self.order = self._toposort(graph.nodes)
        self.position = {id(n): i for i, n in enumerate(self.order)}
        self.static = self._static_nodes()

    def _toposort(self, nodes: Sequence[gs.Node]) -> list[gs.Node]:
        pending = {id(n): sum(1 for t in self.inputs[id(n)] if t.name in self.producer) for n in nodes}
        consumers: dict[str, list[gs.Node]] = {}
        for node in nodes:
            for tensor in self.inputs[id(node)]:
                if tensor.name in self.producer:
                    consumers.setdefault(tensor.name, []).append(node)
        ready = [n for n in nodes if pending[id(n)] == 0]
        order = []
        while ready:
            node = ready.pop(0)
            order.append(node)
            for out in node.outputs:
                for consumer in consumers.get(out.name, []):
                    pending[id(consumer)] -= 1
                    if pending[id(consumer)] == 0:
                        ready.append(consumer)
        if len(order) != len(nodes):
            raise ValueError("graph has a cycle; cannot order it for sequential calibration")
        return order

    def _static_nodes(self) -> set[int]:
        """Nodes computed from constants only (folded into every step that needs them)."""
        static: set[int] = set()
        for node in self.order:
            if all(isinstance(t, gs.Constant) or (t.name in self.producer and id(self.producer[t.name]) in static)
                   for t in self.inputs[id(node)]):
                static.add(id(node))
        return static

    def is_static_tensor(self, tensor: gs.Tensor) -> bool:
        return isinstance(tensor, gs.Constant) or (
            tensor.name in self.producer and id(self.producer[tensor.name]) in self.static)

    def ancestors(self, tensors: Iterable[gs.Tensor], stop: set[int], *, static: bool) -> set[int]:
        """Ids of the producers (transitively) of ``tensors``: non-static nodes not in ``stop``, or,
        with ``static=True``, the static ones."""
        found: set[int] = set()
        stack = [t for t in tensors]
        while stack:
            tensor = stack.pop()
            node = self.producer.get(tensor.name)
            if node is None or id(node) in found or id(node) in stop:
                continue
            if (id(node) in self.static) != static:
                continue
            found.add(id(node))
            stack.extend(self.inputs[id(node)])
        return found


def plan_stages(graph: gs.Graph, gemms: Sequence[WeightedGemm]) -> list[Stage]:
    """Splits ``gemms`` into sequential stages from graph topology (see the module docstring)."""
    topo = _Topology(graph)
    chosen = {id(g.node): g for g in gemms}
    depth: dict[str, int] = {}
    levels: dict[int, int] = {}
    for node in topo.order:
        incoming = max((depth.get(t.name, 0) for t in topo.inputs[id(node)]), default=0)
        if id(node) in chosen:
            incoming = depth.get(chosen[id(node)].activation.name, 0)
            levels[id(node)] = incoming
            incoming += 1
        for out in node.outputs:
            depth[out.name] = incoming
    by_level: dict[int, dict[str, list[str]]] = {}
    for gemm in sorted(gemms, key=lambda g: topo.position[id(g.node)]):
        by_level.setdefault(levels[id(gemm.node)], {}).setdefault(gemm.activation.name, []).append(gemm_key(gemm))
    return [Stage(i, {a: tuple(keys) for a, keys in groups.items()})
            for i, (_, groups) in enumerate(sorted(by_level.items()))]


@dataclass
class _Step:
    """One ONNX Runtime run per batch: ``nodes`` from ``inputs`` to ``outputs`` (= ``carry`` + the
    stage's activations); ``carry`` is kept for later steps, ``drops`` are read here for the last time."""

    stage: Stage
    nodes: list[gs.Node]
    inputs: list[str]
    outputs: list[str]
    carry: list[str]
    drops: list[str]


def _plan_steps(topo: _Topology, stages: Sequence[Stage], activations: Mapping[str, gs.Tensor]) -> list[_Step]:
    done: set[int] = set()
    new_per_step: list[set[int]] = []
    for stage in stages:
        new = topo.ancestors([activations[a] for a in stage.groups], done, static=False)
        done |= new
        new_per_step.append(new)
    step_of: dict[str, int] = {}
    for index, new in enumerate(new_per_step):
        for node in topo.order:
            if id(node) in new:
                for out in node.outputs:
                    step_of[out.name] = index
    last_use: dict[str, int] = {}
    for index, new in enumerate(new_per_step):
        for node in topo.order:
            if id(node) in new:
                for tensor in topo.inputs[id(node)]:
                    if tensor.name in step_of and step_of[tensor.name] < index:
                        last_use[tensor.name] = max(last_use.get(tensor.name, -1), index)
    steps = []
    for index, (stage, new) in enumerate(zip(stages, new_per_step, strict=True)):
        targets = [activations[a] for a in stage.groups]
        run = [n for n in topo.order if id(n) in new]
        needed = [t for n in run for t in topo.inputs[id(n)]] + targets
        folded = topo.ancestors(needed, set(), static=True)
        run = [n for n in topo.order if id(n) in new or id(n) in folded]
        inputs = sorted({t.name for n in run for t in topo.inputs[id(n)]
                         if (t.name in step_of and step_of[t.name] < index) or t.name in topo.graph_inputs})
        produced_here = [out.name for n in topo.order if id(n) in new for out in n.outputs]
        carry = [name for name in produced_here if last_use.get(name, -1) > index]
        outputs = carry + [t.name for t in targets if t.name not in topo.graph_inputs and t.name not in carry]
        drops = [name for name, last in last_use.items() if last == index]
        steps.append(_Step(stage, run, inputs, outputs, carry, drops))
    return steps


def _step_model(graph: gs.Graph, step: _Step, overrides: Mapping[str, np.ndarray],
                example: Mapping[str, np.ndarray], topo: _Topology) -> onnx.ModelProto:
    from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

    nodes = [OnnxExporter.export_node(n) for n in step.nodes]
    initializers, seen = [], set()
    for node in step.nodes:
        for tensor in topo.inputs[id(node)]:
            if isinstance(tensor, gs.Constant) and tensor.name not in seen:
                seen.add(tensor.name)
                if tensor.name in overrides:
                    initializers.append(onnx.numpy_helper.from_array(overrides[tensor.name], tensor.name))
                else:
                    initializers.append(OnnxExporter.export_tensor_proto(tensor))
    inputs = [onnx.helper.make_tensor_value_info(
        name, onnx.helper.np_dtype_to_tensor_dtype(example[name].dtype), [None] * example[name].ndim)
        for name in step.inputs]
    outputs = [onnx.helper.make_empty_tensor_value_info(name) for name in step.outputs]
    body = onnx.helper.make_graph(nodes, f"step_{step.stage.index}", inputs, outputs, initializers)
    opsets = list(graph.import_domains) if graph.import_domains else [onnx.helper.make_opsetid("", graph.opset)]
    model = onnx.helper.make_model(body, opset_imports=opsets, ir_version=10)
    for function in getattr(graph, "functions", None) or []:
        model.functions.append(OnnxExporter.export_function(function))
    return model


def _session(model: onnx.ModelProto, threads: int | None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def run_sequential(
    graph: gs.Graph,
    gemms: Sequence[WeightedGemm],
    feeds: Callable[[], Iterable[Mapping[str, np.ndarray]]],
    quantize_stage: Callable[[Stage, dict[str, torch.Tensor]], Mapping[str, np.ndarray]],
    *,
    threads: int | None = None,
    hessian_dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    show_progress: bool = False,
) -> SequentialReport:
    """Runs calibration data stage by stage, handing each stage's Hessians to ``quantize_stage``.

    The graph is not modified: quantized weights are substituted only inside the per-step models.

    Args:
        graph: the model (read only).
        gemms: the GEMMs to quantize (constant weights, each weight used by one node).
        feeds: returns a fresh iterator of feed dicts (graph input name -> array); it must yield the
            same batches, in the same order, every time it is called.
        quantize_stage: called once per stage with {activation name: H = 2XXᵀ/n}; returns
            {gemm key: dequantized weight in the initializer's own layout and dtype}, which the
            following steps run with. GEMMs it leaves out keep their float weight.
        threads: ONNX Runtime intra-op threads (default: ORT's choice).
        hessian_dtype: accumulator dtype of the Hessians.
        device: where Hessians are accumulated (default CUDA when present).
        show_progress: draw a progress bar over stages.

    Returns:
        A SequentialReport (stage count, peak cache size, time per phase).

    Raises:
        CalibrationDataError: a feed misses a graph input, the feeds change between steps, or a step fails.
    """
    from tqdm import tqdm

    report = SequentialReport()
    if not gemms:
        return report
    topo = _Topology(graph)
    by_key = {gemm_key(g): g for g in gemms}
    stages = plan_stages(graph, gemms)
    activations = {g.activation.name: g.activation for g in gemms}
    steps = _plan_steps(topo, stages, activations)
    report.stages = len(stages)
    gemm_step = {}
    for index, step in enumerate(steps):
        for node in step.nodes:
            gemm_step.setdefault(id(node), index)

    cache: dict[str, list[np.ndarray | None]] = {}
    overrides: dict[str, np.ndarray] = {}
    override_owner: dict[str, int] = {}
    cached_bytes = 0
    for index, step in enumerate(tqdm(steps, desc="GPTQ stages", unit="stage", disable=not show_progress,
                                      leave=False)):
        stage = step.stage
        hessians = {name: HessianAccumulator(by_key[keys[0]].k, dtype=hessian_dtype, device=device)
                    for name, keys in stage.groups.items()}
        session, batches = None, 0
        produced: dict[str, list[np.ndarray | None]] = {name: [] for name in step.carry}
        for b, feed in enumerate(feeds()):
            batches += 1
            values = {}
            for name in step.inputs:
                if name in topo.graph_inputs:
                    if name not in feed:
                        raise CalibrationDataError(f"calibration feed has no array for graph input {name!r}")
                    values[name] = feed[name]
                else:
                    stored = cache.get(name)
                    if stored is None or b >= len(stored) or stored[b] is None:
                        raise CalibrationDataError("calibration feeds yielded a different number of batches "
                                                   "on a later pass; they must be repeatable")
                    values[name] = stored[b]
            outputs: dict[str, np.ndarray] = {}
            if step.nodes and step.outputs:
                if session is None:
                    start = time.perf_counter()
                    session = _session(_step_model(graph, step, overrides, values, topo), threads)
                    report.seconds["build"] += time.perf_counter() - start
                    report.steps_run += 1
                start = time.perf_counter()
                try:
                    results = session.run(step.outputs, values)
                except Exception as err:
                    raise CalibrationDataError(f"running calibration step {stage.index} failed: "
                                               f"{str(err).splitlines()[0]}") from None
                report.seconds["forward"] += time.perf_counter() - start
                outputs = dict(zip(step.outputs, results, strict=True))
            start = time.perf_counter()
            for name, accumulator in hessians.items():
                x = outputs[name] if name in outputs else feed.get(name)
                if x is None:
                    raise CalibrationDataError(f"calibration feed has no array for graph input {name!r}")
                accumulator.add_batch(x)
            report.seconds["hessian"] += time.perf_counter() - start
            for name in step.carry:
                produced[name].append(outputs[name])
                cached_bytes += outputs[name].nbytes
            for name in step.drops:
                stored = cache.get(name)
                if stored is not None and b < len(stored) and stored[b] is not None:
                    cached_bytes -= stored[b].nbytes
                    stored[b] = None
            report.peak_cache_bytes = max(report.peak_cache_bytes, cached_bytes)
        if report.batches and batches != report.batches:
            raise CalibrationDataError(f"calibration feeds yielded {batches} batches, earlier {report.batches}; "
                                       "they must be repeatable")
        report.batches = batches
        for name in step.drops:
            cache.pop(name, None)
        cache.update(produced)
        for name in [n for n, owner in override_owner.items() if owner <= index]:
            overrides.pop(name, None)
            override_owner.pop(name)
        del session

        start = time.perf_counter()
        hs = {name: accumulator.finalize() for name, accumulator in hessians.items()}
        del hessians
        replaced = quantize_stage(stage, hs)
        del hs
        report.seconds["quantize"] += time.perf_counter() - start
        for key, weight in replaced.items():
            gemm = by_key[key]
            owner = gemm_step.get(id(gemm.node))
            if owner is not None and owner > index:
                overrides[gemm.weight.name] = weight
                override_owner[gemm.weight.name] = owner
    logger.info("sequential calibration: %d stages, %d batches, peak cache %.1f MB, forward %.1fs, "
                "hessian %.1fs, quantize %.1fs", report.stages, report.batches, report.peak_cache_bytes / 2**20,
                report.seconds["forward"], report.seconds["hessian"], report.seconds["quantize"])
    return report
