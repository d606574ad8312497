"""Sequential, memory-bounded activation capture: the inputs GPTQ needs, block by block.

GPTQ quantizes a model in order: the Hessian H = 2XXᵀ/n of a layer must come from inputs X computed
through the *already quantized* earlier layers, so each layer corrects the error its predecessors
left. This module does that for any ONNX graph, without knowing what a "transformer block" is.

Stages (from topology, not names). For every GEMM to quantize, level(g) = 1 + the highest level of
the GEMMs to quantize upstream of g's activation input (0 when none). Stage s is the set of GEMMs at
level s: their inputs depend only on GEMMs of earlier stages, which are quantized by then. In a Llama
block this gives {q, k, v}, {o}, {gate, up}, {down}; GEMMs of one stage that read the same tensor
share one Hessian (q/k/v; gate/up).

Steps (a cached cut). Let done_s be every node needed to compute the inputs of
stages 0..s. Step s runs only the nodes in done_s \\ done_{s-1} — which includes the GEMMs of stage
s-1, now with their quantized weights — as its own small ONNX Runtime model whose inputs are the
tensors crossing the cut from earlier steps (the residual stream, the previous stage's inputs, side
tensors such as RoPE tables or masks) plus the graph inputs. Its outputs are this stage's activations
and the tensors later steps need. Over all steps every node runs once per calibration batch (nodes
computed from constants only are folded into each step that needs them; see also rematerialization
below), so capture costs about one forward pass of the model, not one per stage.

Rematerialization. A stage input that is much wider than what it is computed from (SwiGLU's
[*, 2.67·hidden] down-projection input, computed from the [*, hidden] gate/up input) is not kept
until the step that reads it again; that step recomputes it (the producers run twice).

Memory bound. Between steps we keep, for every calibration batch, the tensors crossing the cut; each
is dropped per batch as soon as the last step reading it has consumed that batch. Per-batch copies
that are identical (causal masks, RoPE tables of equal-length windows) share one array. Peak ≈
max over cuts of Σ_{crossing tensors} n_samples · bytes per sample — for a Llama block the residual
stream plus one [*, hidden] stage input, 128 × 512 × 2 × 576 × 4 B ≈ 302 MB for SmolLM2-135M
(554 MB without rematerialization) — plus one stage's Hessians (K² float64 each), one batch's step
activations, and one step's ONNX Runtime session (its weights, no memory arena: see ``_session``).
Quantized weights that later steps run with are held only until the last step that runs their GEMM.
"""

from __future__ import annotations

import ctypes
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


def _input_channels(gemm: WeightedGemm) -> int:
    # From the shape: WeightedGemm.k reads .values, which would load (and keep) every weight.
    return gemm.weight.shape[1] if gemm.transposed else gemm.weight.shape[0]


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


def _known(shape) -> bool:
    return bool(shape) and all(isinstance(d, str) or (isinstance(d, int) and d >= 0) for d in shape)


def _inferred_shapes(graph: gs.Graph, topo: _Topology) -> dict[str, tuple]:
    """Shapes of the tensors whose shape the graph does not record, by ONNX shape inference on a
    weightless copy (large initializers become typed graph inputs; small ones keep their values,
    which Reshape-like ops need)."""
    from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

    nodes = [OnnxExporter.export_node(n) for n in topo.order]
    inputs, initializers, seen = [], [], set()
    for tensor in graph.inputs:
        if tensor.dtype is not None:
            inputs.append(onnx.helper.make_tensor_value_info(tensor.name, onnx.helper.np_dtype_to_tensor_dtype(
                np.dtype(tensor.dtype)), tensor.shape))
    for node in topo.order:
        for tensor in topo.inputs[id(node)]:
            if not isinstance(tensor, gs.Constant) or tensor.name in seen:
                continue
            seen.add(tensor.name)
            if int(np.prod(tensor.shape, dtype=np.int64)) <= 1024:
                initializers.append(OnnxExporter.export_tensor_proto(tensor))
            else:
                inputs.append(onnx.helper.make_tensor_value_info(
                    tensor.name, onnx.helper.np_dtype_to_tensor_dtype(np.dtype(tensor.dtype)), list(tensor.shape)))
    opsets = list(graph.import_domains) if graph.import_domains else [onnx.helper.make_opsetid("", graph.opset)]
    model = onnx.helper.make_model(onnx.helper.make_graph(nodes, "shapes", inputs, [], initializers),
                                   opset_imports=opsets, ir_version=10)
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception as err:  # inference is an optimisation here, never a requirement
        logger.debug("shape inference failed (%s); no rematerialization", err)
        return {}
    shapes = {}
    for info in inferred.graph.value_info:
        dims = info.type.tensor_type.shape.dim
        shapes[info.name] = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in dims)
    return shapes


def _per_token_size(tensor: gs.Tensor, shapes: Mapping[str, tuple]) -> tuple[int, tuple[str, ...]] | None:
    """(bytes of the static dims, sorted symbolic dims), or None when a dim is unknown. Two tensors
    with the same symbolic dims (batch, seq) compare by the first number: their size per token."""
    shape = tensor.shape if _known(tensor.shape) else shapes.get(tensor.name)
    if not _known(shape):
        return None
    static = int(np.prod([d for d in shape if isinstance(d, int)], dtype=np.int64))
    itemsize = np.dtype(tensor.dtype).itemsize if tensor.dtype is not None else 4  # unknown: assume float32
    return static * itemsize, tuple(sorted(str(d) for d in shape if not isinstance(d, int)))


def _rematerialize(topo: _Topology, new_per_step: list[set[int]], targets: list[list[gs.Tensor]],
                   shapes: Mapping[str, tuple]) -> list[set[int]]:
    """Which nodes each step re-runs so that a wide stage input is not kept between steps.

    Stage s's input T is computed in step s (for the Hessian) and read again in one later step t
    (by the now-quantized GEMMs). When T is at least twice as large per token as the earlier tensors
    its producers in step s read and that would otherwise not be kept until step t (e.g. SwiGLU's
    [*, 2.67·hidden] down-projection input, computed from the [*, hidden] gate/up input), step t
    recomputes it from those instead: the same values (the same quantized weights), fewer bytes kept,
    at the price of running those producers twice. Sizes come from the graph's shapes (symbolic
    batch/seq dims must match); without shapes nothing is recomputed.
    """
    step_of = {out.name: i for i, new in enumerate(new_per_step) for n in topo.order if id(n) in new for out in n.outputs}
    consumers: dict[str, set[int]] = {}
    for i, new in enumerate(new_per_step):
        for n in topo.order:
            if id(n) in new:
                for tensor in topo.inputs[id(n)]:
                    consumers.setdefault(tensor.name, set()).add(i)
    last_use = {name: max(steps) for name, steps in consumers.items()}
    extra: list[set[int]] = [set() for _ in new_per_step]
    for s, stage_targets in enumerate(targets):
        for target in stage_targets:
            later = {i for i in consumers.get(target.name, ()) if i > s}
            if step_of.get(target.name) != s or len(later) != 1:
                continue
            t = later.pop()
            recompute = topo.ancestors([target], set(), static=False) & new_per_step[s]
            produced = {out.name for n in topo.order if id(n) in recompute for out in n.outputs}
            if any(last_use.get(name, -1) > s for name in produced - {target.name}):
                continue  # another output of these nodes is kept anyway: recomputing would clash with it
            reads = {tensor.name: tensor for n in topo.order if id(n) in recompute for tensor in topo.inputs[id(n)]
                     if tensor.name in step_of and step_of[tensor.name] < s}
            benefit = _per_token_size(target, shapes)
            costs = [_per_token_size(tensor, shapes) for name, tensor in reads.items() if last_use.get(name, -1) < t]
            if benefit is None or any(c is None or c[1] != benefit[1] for c in costs):
                continue
            if benefit[0] < 2 * sum(c[0] for c in costs):
                continue  # not worth running the producers twice for less than half the bytes
            extra[t] |= recompute
            for name in reads:
                last_use[name] = max(last_use.get(name, -1), t)
            logger.debug("stage %d input %s is recomputed in step %d instead of kept", s, target.name, t)
    return extra


def _plan_steps(topo: _Topology, stages: Sequence[Stage], activations: Mapping[str, gs.Tensor],
                shapes: Mapping[str, tuple] | None = None) -> list[_Step]:
    """Steps of the sequential run; with ``shapes`` (tensor name -> shape, for tensors the graph
    leaves unshaped), wide stage inputs are recomputed instead of kept (``_rematerialize``)."""
    done: set[int] = set()
    new_per_step: list[set[int]] = []
    for stage in stages:
        new = topo.ancestors([activations[a] for a in stage.groups], done, static=False)
        done |= new
        new_per_step.append(new)
    targets = [[activations[a] for a in stage.groups] for stage in stages]
    extra = (_rematerialize(topo, new_per_step, targets, shapes) if shapes is not None
             else [set() for _ in stages])
    runs = [new | more for new, more in zip(new_per_step, extra, strict=True)]
    step_of: dict[str, int] = {}
    for index, new in enumerate(new_per_step):
        for node in topo.order:
            if id(node) in new:
                for out in node.outputs:
                    step_of[out.name] = index
    # A tensor read in step i is an input of step i unless step i computes it itself.
    external: list[set[str]] = []
    last_use: dict[str, int] = {}
    for index, run in enumerate(runs):
        made_here = {out.name for n in topo.order if id(n) in run for out in n.outputs}
        reads = {t.name for n in topo.order if id(n) in run for t in topo.inputs[id(n)]}
        external.append(reads - made_here)
        for name in reads - made_here:
            if name in step_of and step_of[name] < index:
                last_use[name] = max(last_use.get(name, -1), index)
    steps = []
    for index, (stage, new, run_set) in enumerate(zip(stages, new_per_step, runs, strict=True)):
        run = [n for n in topo.order if id(n) in run_set]
        needed = [t for n in run for t in topo.inputs[id(n)]] + targets[index]
        folded = topo.ancestors(needed, set(), static=True)
        run = [n for n in topo.order if id(n) in run_set or id(n) in folded]
        inputs = sorted(name for name in external[index]
                        if (name in step_of and step_of[name] < index) or name in topo.graph_inputs)
        produced_here = [out.name for n in topo.order if id(n) in new for out in n.outputs]
        carry = [name for name in produced_here if last_use.get(name, -1) > index]
        outputs = carry + [t.name for t in targets[index] if t.name not in topo.graph_inputs and t.name not in carry]
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


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """Exact equality, rejecting the usual mismatch (activations of different windows) cheaply."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.size and (a.flat[0] != b.flat[0] or a.flat[-1] != b.flat[-1]):
        return False
    return bool(np.array_equal(a, b))


def _release_freed_memory() -> None:
    """Asks glibc to return freed heap pages to the OS. Steps free hundreds of MB of per-batch arrays
    that were interleaved with long-lived cached ones; without this, RSS keeps their high-water mark."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _session(model: onnx.ModelProto, threads: int | None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    # Runs alternate with torch work (Hessians, GPTQ) on the same cores: ORT's worker threads must not
    # keep spinning after a run and steal those cores.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # ONNX Runtime hands outputs back as views of its own buffers; from the arena, one cached output
    # would pin the whole arena of a finished step (measured: +0.5-1 GB at 128 x 512 tokens). Without
    # the arena every output buffer is its own allocation, freed with the array.
    options.enable_cpu_mem_arena = False
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
    rematerialize: bool = True,
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
        rematerialize: recompute a stage input in the step that reads it again when that keeps fewer
            bytes between steps than storing it (more compute, less memory; see ``_rematerialize``).
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
    shapes = None
    if rematerialize:
        unshaped = any(not _known(t.shape) for n in topo.order for t in n.outputs)
        shapes = _inferred_shapes(graph, topo) if unshaped else {}
    steps = _plan_steps(topo, stages, activations, shapes)
    report.stages = len(stages)
    gemm_step = {}  # the last step that runs each node (a recomputed GEMM runs in two)
    for index, step in enumerate(steps):
        for node in step.nodes:
            gemm_step[id(node)] = index

    cache: dict[str, list[np.ndarray | None]] = {}
    overrides: dict[str, np.ndarray] = {}
    override_owner: dict[str, int] = {}
    cached_bytes = 0
    references: dict[int, int] = {}  # id(array) -> cache slots holding it (deduplicated side tensors)
    for index, step in enumerate(tqdm(steps, desc="GPTQ stages", unit="stage", disable=not show_progress,
                                      leave=False)):
        stage = step.stage
        hessians = {name: HessianAccumulator(_input_channels(by_key[keys[0]]), dtype=hessian_dtype, device=device)
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
                value = outputs[name]
                first = produced[name][0] if produced[name] else None
                if first is not None and _same(first, value):
                    value = first  # side tensors (masks, RoPE tables) repeat across batches: keep one copy
                else:
                    cached_bytes += value.nbytes
                references[id(value)] = references.get(id(value), 0) + 1
                produced[name].append(value)
            for name in step.drops:
                stored = cache.get(name)
                if stored is not None and b < len(stored) and stored[b] is not None:
                    references[id(stored[b])] -= 1
                    if references[id(stored[b])] == 0:
                        del references[id(stored[b])]
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
        _release_freed_memory()

        start = time.perf_counter()
        hs = {name: accumulator.finalize() for name, accumulator in hessians.items()}
        del hessians
        replaced = quantize_stage(stage, hs)
        del hs
        _release_freed_memory()
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
