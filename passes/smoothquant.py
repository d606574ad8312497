"""SmoothQuant: migrate activation outliers into the weights, folded so it costs nothing at run time.

For Y = X W (X [T, K], W [K, N]) and s in R^K_{>0}:  Y = (X diag(s)^-1)(diag(s) W).
The weight side is a constant fold (row j of every consumer's W times s_j). The activation side,
X / s, must be absorbed by whatever produces X; this pass handles:

1. **Per-channel affine producers** (LayerNorm/RMSNorm gains, as a single op or as the decomposed
   ``... -> Mul(gain) [-> Add(bias)]`` chain torch exports):
   X = g * z + b  =>  X / s = (g / s) * z + (b / s).
   Single ops: LayerNormalization, SimplifiedLayerNormalization, RMSNormalization (scale, bias inputs).
2. **A preceding linear op** whose output channels reach X unmixed:
   * elementwise gate, e.g. SwiGLU's down-projection input X = act(gate) * (h W_up):
     dividing column j of W_up by s_j divides X_j by s_j (the gate operand is untouched);
   * the attention value path X = reshape(P V) with V = h W_v: softmax rows P mix tokens, not
     channels, so dividing column c of W_v by s_c divides every output channel j that reads V channel
     c = m(j) by the same amount. The map m (which V column feeds which X channel, many-to-one with
     GQA) is read off one ONNX Runtime run in which V is replaced by its column index: P's rows sum
     to 1, so X_j = m(j) exactly. Channels sharing a V column then share one factor (their maxima
     are pooled before s is computed).
   Either may read a column slice of a fused projection (Phi-3's gate_up split in two by ``Split``,
   q/k/v cut out of qkv by constant ``Slice``s of disjoint columns): only the columns X reads are
   divided, and no other reader of the fused output reads them.
   Optional bias Adds along the way are divided by s too.

X itself may feed only the GEMMs of the group and Shape ops, which read no values (if anything else
reads it, e.g. a post-norm residual, nothing can absorb 1/s). Where nothing can absorb it, the group
is left unsmoothed, or with ``insert_mul=True`` an explicit Mul(X, 1/s) is inserted; both are reported.

``alpha="auto"`` searches ``alpha_grid`` per group, minimising the group's relative W8A8 output error
(fake-quantised with the recipe's activation scheme) on a token subsample of calibration data.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from qcompiler.algorithms.smoothing import smoothed_gemm_error, smoothing_factors
from qcompiler.calibration import CalibrationStats, collect_activation_samples
from qcompiler.config import ActivationScheme, SmoothQuantConfig
from qcompiler.graph import KEEP_FLOAT_SUFFIX, WeightedGemm, constant_value, export_graph, value_readers, weighted_gemms
from qcompiler.pass_manager import PassContext, PassResult

__all__ = ["SmoothQuant"]

logger = logging.getLogger(__name__)

_NORM_OPS = {"LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization"}
# Ops a value path may pass through between V's projection and the attention output: they move,
# replicate or token-mix channels but never combine two channels into one.
_PATH_OPS = {"Reshape", "Transpose", "Expand", "Unsqueeze", "Squeeze", "Identity", "Split", "Slice", "MatMul"}


@dataclass
class _Absorber:
    """Where 1/s goes: per-channel constants to divide, or a weight whose columns to divide."""

    kind: str  # "affine" | "linear"
    gains: list[gs.Constant] = field(default_factory=list)  # divided elementwise by s
    gemm: WeightedGemm | None = None
    biases: list[gs.Constant] = field(default_factory=list)  # divided by s[mapped]
    channel_map: np.ndarray | None = None  # X channel j <- producer column channel_map[j]
    needs_probe: bool = False
    description: str = ""


@dataclass
class _Group:
    activation: gs.Variable
    gemms: list[WeightedGemm]
    absorber: _Absorber | None = None
    reason: str = ""


class SmoothQuant:
    """Applies SmoothQuant to every group of constant-weight GEMMs sharing one activation.

    Args:
        config: alpha (or "auto"), grid, whether to fold into preceding linear ops.
        activation: the W8A8 activation scheme (only used to score alpha candidates).
        insert_mul: when nothing can absorb 1/s, insert an explicit Mul (default: leave the group alone).
    """

    name = "smoothquant"
    exact = True

    def __init__(self, config: SmoothQuantConfig | None = None,
                 activation: ActivationScheme = ActivationScheme.PER_TOKEN_DYNAMIC, insert_mul: bool = False):
        self.config = config or SmoothQuantConfig()
        self.activation = activation
        self.insert_mul = insert_mul

    def run(self, graph: gs.Graph, context: PassContext) -> PassResult:
        stats: CalibrationStats | None = context.stats
        if stats is None:
            raise ValueError("SmoothQuant needs calibration statistics (per-channel max|x| of GEMM inputs)")
        result = PassResult(changed=False)
        groups = self._groups(graph, context, stats, result)
        for group in groups:
            group.absorber, group.reason = self._find_absorber(graph, group)
        self._probe_channel_maps(graph, [g for g in groups if g.absorber and g.absorber.needs_probe], context)
        alphas = self._choose_alphas(graph, groups, stats, context)
        inserted = 0
        for group in groups:
            if group.absorber is None and not self.insert_mul:
                result.not_fired.append((group.activation.name, f"nothing can absorb 1/s: {group.reason}; left unsmoothed"))
                continue
            alpha = alphas[group.activation.name]
            s = self._factors(group, stats, alpha)
            for gemm in group.gemms:
                _scale_weight_rows(gemm, s)
            if group.absorber is None:
                _insert_mul(graph, group, s)
                inserted += 1
                how = "inserted Mul"
            else:
                _absorb(group.absorber, s)
                how = group.absorber.description
            result.changed = True
            result.details.append({"activation": group.activation.name, "gemms": [g.node.name for g in group.gemms],
                                   "alpha": alpha, "absorbed_by": how,
                                   "max_factor": float(s.max()), "min_factor": float(s.min())})
        folded = len(result.details) - inserted
        result.summary = (f"smoothed {len(result.details)} of {len(groups)} activation groups "
                          f"({sum(len(d['gemms']) for d in result.details)} GEMMs); {folded} folded, "
                          f"{inserted} with an inserted Mul, {len(groups) - len(result.details)} left alone")
        if inserted:
            logger.warning("SmoothQuant inserted %d Mul node(s) where nothing could absorb 1/s", inserted)
        return result

    # --- discovery -----------------------------------------------------------------------------

    def _groups(self, graph: gs.Graph, context: PassContext, stats: CalibrationStats,
                result: PassResult) -> list[_Group]:
        by_activation: dict[str, _Group] = {}
        for gemm in weighted_gemms(graph):
            name = gemm.node.name or gemm.node.outputs[0].name
            if context.is_excluded(name) or name.endswith(KEEP_FLOAT_SUFFIX):
                result.not_fired.append((name, "excluded"))
                continue
            if gemm.activation.name not in stats:
                result.not_fired.append((name, f"no calibration statistics for its input {gemm.activation.name}"))
                continue
            group = by_activation.setdefault(gemm.activation.name, _Group(gemm.activation, []))
            group.gemms.append(gemm)
        groups = []
        for group in by_activation.values():
            shared = [g.node.name for g in group.gemms if g.weight_is_shared]
            if shared:
                result.not_fired.append((group.activation.name, f"weight shared with other nodes: {shared}"))
                continue
            k = stats[group.activation.name].channel_absmax.size
            if any(g.k != k for g in group.gemms):
                result.not_fired.append((group.activation.name, "input channels of the weights and activation differ"))
                continue
            groups.append(group)
        return groups

    def _find_absorber(self, graph: gs.Graph, group: _Group) -> tuple[_Absorber | None, str]:
        x = group.activation
        group_nodes = {id(g.node) for g in group.gemms}
        others = [n.op for n in value_readers(x) if id(n) not in group_nodes]
        if others:
            return None, f"{x.name} also feeds {others}"
        if x in graph.outputs or x in graph.inputs or not x.inputs:
            return None, f"{x.name} is a graph input/output"
        k = group.gemms[0].k
        affine = _affine_absorber(x, k)
        if affine is not None:
            return affine, ""
        if not self.config.fold_into_linear:
            return None, "producer is not a per-channel affine op (linear folding disabled)"
        return _linear_absorber(graph, x, k)

    # --- value-path channel maps ---------------------------------------------------------------

    def _probe_channel_maps(self, graph: gs.Graph, groups: list[_Group], context: PassContext) -> None:
        if not groups:
            return
        if context.calibration_feeds is None:
            for group in groups:
                group.reason = "value-path folding needs one calibration sample to map channels"
                group.absorber = None
            return
        probe = graph.copy()
        probe_tensors = probe.tensors()
        outputs = []
        for group in groups:
            gemm_out = group.absorber.gemm.node.outputs[0].name
            t = probe_tensors[gemm_out]
            n = group.absorber.gemm.n
            for bias in group.absorber.biases:  # the probe needs pure column indices at the end of the path
                if bias.name in probe_tensors:
                    probe_tensors[bias.name].values = np.zeros_like(bias.values)
            producer = t.inputs[0]
            replaced = gs.Variable(gemm_out + "/probe_src", dtype=t.dtype)
            producer.outputs = [replaced]
            zero = gs.Constant(gemm_out + "/probe_zero", np.zeros((), np.float32))
            index = gs.Constant(gemm_out + "/probe_index", np.arange(n, dtype=np.float32))
            zeroed = gs.Variable(gemm_out + "/probe_zeroed", dtype=t.dtype)
            probe.nodes.append(gs.Node("Mul", inputs=[replaced, zero], outputs=[zeroed]))
            probe.nodes.append(gs.Node("Add", inputs=[zeroed, index], outputs=[t]))
            activation = probe_tensors[group.activation.name]
            if activation.dtype is None:  # exports without value_info (TorchScript) leave intermediates untyped
                activation.dtype = group.absorber.gemm.weight.dtype
            outputs.append(activation)
        probe.outputs = outputs
        probe.cleanup().toposort()
        feed = next(iter(context.calibration_feeds()))
        values = _run(export_graph(probe), [o.name for o in outputs], feed)
        for group, value in zip(groups, values, strict=True):
            rows = value.reshape(-1, value.shape[-1])
            mapping = np.rint(rows[0]).astype(np.int64)
            ok = (np.abs(rows - mapping).max() < 1e-3 and mapping.min() >= 0
                  and mapping.max() < group.absorber.gemm.n)
            if not ok:
                group.reason = "value path mixes channels (probe did not give a channel map)"
                group.absorber = None
                continue
            group.absorber.channel_map = mapping

    # --- alpha -----------------------------------------------------------------------------------

    def _factors(self, group: _Group, stats: CalibrationStats, alpha: float) -> np.ndarray:
        act = stats[group.activation.name].channel_absmax.astype(np.float64)
        wmax = np.max([np.abs(g.weight_kn).max(axis=1) for g in group.gemms], axis=0).astype(np.float64)
        mapping = group.absorber.channel_map if group.absorber else None
        if mapping is None:
            return smoothing_factors(act, wmax, alpha)
        # Channels reading one producer column must share its factor: pool their maxima first.
        columns = group.absorber.gemm.n
        pooled_act = np.zeros(columns)
        pooled_w = np.zeros(columns)
        np.maximum.at(pooled_act, mapping, act)
        np.maximum.at(pooled_w, mapping, wmax)
        return smoothing_factors(pooled_act, pooled_w, alpha)[mapping]

    def _choose_alphas(self, graph: gs.Graph, groups: list[_Group], stats: CalibrationStats,
                       context: PassContext) -> dict[str, float]:
        if self.config.alpha != "auto":
            return {g.activation.name: float(self.config.alpha) for g in groups}
        active = [g for g in groups if g.absorber is not None or self.insert_mul]
        if context.calibration_feeds is None:
            raise ValueError("SmoothQuant alpha='auto' needs calibration data to score candidates")
        samples = collect_activation_samples(export_graph(graph), [g.activation.name for g in active],
                                             context.calibration_feeds, max_batches=self.config.auto_samples,
                                             max_rows=512)
        per_token = self.activation == ActivationScheme.PER_TOKEN_DYNAMIC
        alphas = {g.activation.name: 0.5 for g in groups}
        for group in active:
            x = samples[group.activation.name]
            act = stats[group.activation.name].channel_absmax
            weights = [g.weight_kn.astype(np.float32) for g in group.gemms]
            errors = {a: smoothed_gemm_error(x, weights, self._factors(group, stats, a), per_token, act)
                      for a in self.config.alpha_grid}
            alphas[group.activation.name] = min(errors, key=errors.get)
        return alphas


def _run(model, output_names: list[str], feed: dict) -> list[np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(output_names, feed)


def _per_channel_constant(tensor: gs.Tensor, k: int) -> np.ndarray | None:
    """The value of a constant that broadcasts along the last axis only ([K] or [1, .., K])."""
    value = constant_value(tensor)
    if value is None or value.size != k or value.shape[-1] != k or not np.issubdtype(value.dtype, np.floating):
        return None
    return value


def _own_constant(node: gs.Node, index: int) -> gs.Constant:
    """The node's constant input, copied first if anything else reads it (so scaling stays local)."""
    tensor = node.inputs[index]
    value = constant_value(tensor)
    if isinstance(tensor, gs.Constant) and len(tensor.outputs) == 1:
        return tensor
    own = gs.Constant(f"{tensor.name}/smoothed_{node.name}", np.array(value, copy=True))
    node.inputs[index] = own
    return own


def _affine_absorber(x: gs.Variable, k: int) -> _Absorber | None:
    tensor, producer = x, x.inputs[0]
    # A row-major Reshape that keeps the last dimension (K on both sides: the GEMM reads K, the
    # per-channel constant below has K) keeps every element in its channel, e.g. [B, S, K] -> [B*S, K].
    while producer.op in ("Reshape", "Identity") and producer.inputs[0].inputs \
            and _exclusive(producer.inputs[0], producer):
        tensor, producer = producer.inputs[0], producer.inputs[0].inputs[0]
    if producer.op in _NORM_OPS:
        if len(producer.outputs) > 0 and producer.outputs[0] is tensor and len(producer.inputs) > 1 \
                and _per_channel_constant(producer.inputs[1], k) is not None:
            gains = [_own_constant(producer, 1)]
            if len(producer.inputs) > 2 and producer.op == "LayerNormalization" \
                    and _per_channel_constant(producer.inputs[2], k) is not None:
                gains.append(_own_constant(producer, 2))
            return _Absorber("affine", gains=gains, description=f"{producer.op} {producer.name} scale")
        return None
    bias_index = None
    if producer.op == "Add":
        bias_index = next((i for i in (0, 1) if _per_channel_constant(producer.inputs[i], k) is not None), None)
        if bias_index is None:
            return None
        inner = producer.inputs[1 - bias_index]
        if not _exclusive(inner, producer) or not inner.inputs:
            return None
        mul = inner.inputs[0]
    else:
        mul = producer
    if mul.op != "Mul":
        return None
    gain_index = next((i for i in (0, 1) if _per_channel_constant(mul.inputs[i], k) is not None), None)
    if gain_index is None:
        return None
    gains = [_own_constant(mul, gain_index)]
    if bias_index is not None:
        gains.append(_own_constant(producer, bias_index))
    return _Absorber("affine", gains=gains, description=f"per-channel gain of {mul.name}")


def _exclusive(tensor: gs.Tensor, consumer: gs.Node) -> bool:
    """True if ``consumer`` is the only node that reads ``tensor``'s values."""
    return all(n is consumer for n in value_readers(tensor))


def _linear_absorber(graph: gs.Graph, x: gs.Variable, k: int) -> tuple[_Absorber | None, str]:
    gemms_by_output = {id(g.node.outputs[0]): g for g in weighted_gemms(graph)}
    graph_outputs = {t.name for t in graph.outputs}
    biases: list[gs.Constant] = []
    needs_probe = False
    offset = None  # the first GEMM output column X reads, when a sliced gate operand leads to the GEMM
    tensor = x
    for _ in range(32):
        if tensor.name in graph_outputs or not tensor.inputs:
            return None, f"{tensor.name} is a graph input/output on the path"
        node = tensor.inputs[0]
        gemm = gemms_by_output.get(id(tensor))
        if gemm is not None:
            if gemm.weight_is_shared:
                return None, f"weight of {node.name} is shared"
            if gemm.node.op == "Gemm" and len(node.inputs) > 2:
                bias = node.inputs[2]
                if not isinstance(bias, gs.Constant):
                    return None, f"{node.name} has a dynamic bias"
                biases.append(_own_constant(node, 2))
            mapping = None if needs_probe else (offset or 0) + np.arange(k)
            if not needs_probe and offset is None and gemm.n != k:
                return None, f"{node.name} has {gemm.n} outputs for {k} channels"
            if any(b.values.size != gemm.n for b in biases):
                return None, f"a bias on the path from {node.name} is not per output column"
            return _Absorber("linear", gemm=gemm, biases=biases, channel_map=mapping, needs_probe=needs_probe,
                             description=f"columns of {node.name}"), ""
        if node.op == "Add":
            bias_index = next((i for i in (0, 1) if isinstance(node.inputs[i], gs.Constant)), None)
            if bias_index is None:
                return None, f"{node.name} adds two dynamic tensors"
            biases.append(_own_constant(node, bias_index))
            nxt = node.inputs[1 - bias_index]
        elif node.op == "Mul" and not needs_probe:
            # Elementwise gate: follow the operand produced by a GEMM that nothing else reads, or by a
            # column slice of one (a fused gate_up projection split in two).
            candidates = [t for t in node.inputs if id(t) in gemms_by_output and _exclusive(t, node)
                          and gemms_by_output[id(t)].n == k]
            sliced = [(t, c) for t in node.inputs if _exclusive(t, node)
                      for c in [_sliced_gemm_columns(t, gemms_by_output)] if c is not None and c[1] - c[0] == k]
            if len(candidates) + len(sliced) != 1 or any(isinstance(t, gs.Constant) for t in node.inputs):
                return None, f"{node.name} is not an elementwise gate of one linear op"
            if sliced:
                t, (offset, _) = sliced[0]
                tensor = t.inputs[0].inputs[0]
                continue
            nxt = candidates[0]
        elif node.op in _PATH_OPS:
            if node.op == "MatMul":
                if isinstance(node.inputs[0], gs.Constant):
                    return None, f"{node.name} mixes channels with a constant"
                nxt = node.inputs[1]
            else:
                nxt = node.inputs[0]
            needs_probe = True
        else:
            return None, f"producer {node.op} {node.name} cannot absorb 1/s"
        if not _exclusive(nxt, node) and not (node.op == "Slice" and _disjoint_column_slices(nxt, gemms_by_output)):
            return None, f"{nxt.name} has other readers"
        tensor = nxt
    return None, "path too long"


def _slice_columns(node: gs.Node, index: int, width: int | None) -> tuple[int, int] | None:
    """[lo, hi) of the last axis (``width`` long, if its shape does not say) of ``node.inputs[0]`` that
    output ``index`` of a Split, or of a single-axis unit-step Slice, with constant parameters reads;
    None for anything else."""
    x = node.inputs[0]
    width = x.shape[-1] if x.shape and isinstance(x.shape[-1], int) else width
    rank = len(x.shape) if x.shape is not None else None

    def last(axis) -> bool:
        return int(axis) == -1 or (rank is not None and int(axis) == rank - 1)

    def given(i: int) -> np.ndarray | None:
        return constant_value(node.inputs[i]) if len(node.inputs) > i and node.inputs[i].name else None

    if node.op == "Split" and last(node.attrs.get("axis", 0)):
        sizes = given(1) if given(1) is not None else node.attrs.get("split")
        if sizes is None:  # equal parts (the last one shorter), as Split-18's num_outputs defines them
            if width is None:
                return None
            size = -(-width // len(node.outputs))
            sizes = [size] * (len(node.outputs) - 1) + [width - size * (len(node.outputs) - 1)]
        offsets = np.cumsum([0, *np.asarray(sizes).reshape(-1).tolist()])
        return int(offsets[index]), int(offsets[index + 1])
    if node.op != "Slice" or width is None or given(1) is None or given(2) is None:
        return None
    starts, ends = given(1).reshape(-1), given(2).reshape(-1)
    axes = given(3).reshape(-1) if given(3) is not None else np.arange(starts.size)
    steps = given(4).reshape(-1) if given(4) is not None else np.ones(1)
    if starts.size != 1 or not last(axes[0]) or steps.size != 1 or steps[0] != 1:
        return None
    lo, hi = (int(np.clip(v + width if v < 0 else v, 0, width)) for v in (starts[0], ends[0]))
    return lo, hi


def _disjoint_column_slices(tensor: gs.Tensor, gemms_by_output: dict) -> bool:
    """True if every reader of ``tensor`` (Shape aside) is a constant Slice of its own last-axis columns
    (fused q/k/v sliced apart): scaling the columns one of them reads changes nothing the others read."""
    width = gemms_by_output[id(tensor)].n if id(tensor) in gemms_by_output else None
    ranges = []
    for reader in value_readers(tensor):
        columns = _slice_columns(reader, 0, width) if reader.op == "Slice" else None
        if columns is None:
            return False
        ranges.append(columns)
    ranges.sort()
    return all(a[1] <= b[0] for a, b in zip(ranges, ranges[1:], strict=False))


def _sliced_gemm_columns(t: gs.Tensor, gemms_by_output: dict) -> tuple[int, int] | None:
    """[lo, hi) if ``t`` is a column slice (Split output or Slice) of a GEMM output that nothing else
    reads but that Split or disjoint Slices."""
    if len(t.inputs) != 1 or t.inputs[0].op not in ("Split", "Slice"):
        return None
    node = t.inputs[0]
    source = node.inputs[0]
    if id(source) not in gemms_by_output:
        return None
    if not (_exclusive(source, node) or (node.op == "Slice" and _disjoint_column_slices(source, gemms_by_output))):
        return None
    return _slice_columns(node, node.outputs.index(t), gemms_by_output[id(source)].n)


def _scale_weight_rows(gemm: WeightedGemm, s: np.ndarray) -> None:
    values = gemm.weight.values
    if gemm.transposed:  # [N, K]: input channel j is column j
        gemm.weight.values = (values * s[None, :].astype(values.dtype)).astype(values.dtype)
    else:
        gemm.weight.values = (values * s[:, None].astype(values.dtype)).astype(values.dtype)


def _absorb(absorber: _Absorber, s: np.ndarray) -> None:
    if absorber.kind == "affine":
        for constant in absorber.gains:
            constant.values = (constant.values / s.reshape(constant.values.shape)).astype(constant.values.dtype)
        return
    gemm = absorber.gemm
    column_factor = np.ones(gemm.n, np.float64)
    column_factor[absorber.channel_map] = s  # pooled: every j with the same column has the same s_j
    values = gemm.weight.values
    if gemm.transposed:  # [N, K]: output channel c is row c
        gemm.weight.values = (values / column_factor[:, None]).astype(values.dtype)
    else:
        gemm.weight.values = (values / column_factor[None, :]).astype(values.dtype)
    for bias in absorber.biases:
        bias.values = (bias.values / column_factor.reshape(bias.values.shape)).astype(bias.values.dtype)


def _insert_mul(graph: gs.Graph, group: _Group, s: np.ndarray) -> None:
    x = group.activation
    inverse = gs.Constant(f"{x.name}/smooth_inverse", (1.0 / s).astype(np.float32))
    smoothed = gs.Variable(f"{x.name}/smoothed", dtype=x.dtype, shape=x.shape)
    graph.nodes.append(gs.Node("Mul", name=f"{x.name}/smooth_mul", inputs=[x, inverse], outputs=[smoothed]))
    for gemm in group.gemms:
        gemm.node.inputs[0] = smoothed
