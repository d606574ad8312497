"""Evaluation: compiled vs original model on held-out samples, perplexity, latency, per-layer SQNR."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx

from qcompiler.backends.onnxruntime import create_session, measure_latency
from qcompiler.calibration import _session
from qcompiler.errors import QCompileError

__all__ = ["OutputAgreement", "LayerError", "Evaluation", "compare_outputs", "perplexity", "perplexity_of", "layer_sqnr", "holds_plugin_ops",
           "lm_feeds", "logits_through_cache", "cache_inputs", "compare_decode_steps", "latency_pair"]

logger = logging.getLogger(__name__)


@dataclass
class OutputAgreement:
    """How closely one output of the compiled model follows the original, over all samples."""

    name: str
    cosine: float
    sqnr_db: float
    max_abs_error: float


@dataclass
class LayerError:
    """SQNR of one GEMM's output in the compiled model against the original (errors accumulate)."""

    tensor: str
    op: str
    sqnr_db: float


@dataclass
class Evaluation:
    samples: int = 0
    outputs: list[OutputAgreement] = field(default_factory=list)
    perplexity_original: float | None = None
    perplexity_compiled: float | None = None
    perplexity_windows: int = 0
    latency_original_ms: float | None = None
    latency_compiled_ms: float | None = None
    latency_shape: dict[str, list[int]] = field(default_factory=dict)
    threads: int | None = None
    layers: list[LayerError] = field(default_factory=list)

    @property
    def speedup(self) -> float | None:
        if self.latency_original_ms and self.latency_compiled_ms:
            return self.latency_original_ms / self.latency_compiled_ms
        return None

    def to_dict(self) -> dict:
        data = asdict(self)
        data["speedup"] = self.speedup
        return data


def _db(signal: float, noise: float) -> float:
    if noise <= 0:
        return math.inf
    return 10.0 * math.log10(max(signal, 1e-300) / noise)


def holds_plugin_ops(model: onnx.ModelProto) -> bool:
    """Whether the graph has qcompiler plugin ops (TensorRT's; ONNX Runtime cannot run it)."""
    return any(n.domain == "qcompiler" for n in model.graph.node)


def _runner(path: Path, threads: int | None):
    """Something with ONNX Runtime's ``run(names, feed)``: a CPU session, or for a graph with qcompiler
    plugin ops, ONNX's reference evaluator with the ops' numpy references (slow, but the same function)."""
    model = onnx.load(str(path))
    if not holds_plugin_ops(model):
        return create_session(path, threads)
    from qcompiler.backends.plugin_graph import plugin_graph_evaluator

    logger.info("%s holds qcompiler plugin ops: evaluating it with their numpy references", path)
    return plugin_graph_evaluator(model)


class _Agreement:
    """Cosine, SQNR and max |error| of one output, accumulated over sample pairs."""

    def __init__(self):
        self.sums = np.zeros(4)  # <a,b>, |a|^2, |b|^2, |a-b|^2
        self.max_abs = 0.0

    def add(self, a: np.ndarray, b: np.ndarray) -> None:
        a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
        self.sums += (a @ b, a @ a, b @ b, np.sum((a - b) ** 2))
        self.max_abs = max(self.max_abs, float(np.max(np.abs(a - b))) if a.size else 0.0)

    def result(self, name: str) -> OutputAgreement:
        dot, aa, bb, noise = self.sums
        cosine = float(dot / math.sqrt(aa * bb)) if aa > 0 and bb > 0 else 1.0
        return OutputAgreement(name, cosine, _db(aa, noise), self.max_abs)


def compare_outputs(original: Path, compiled: Path, feeds: Iterable[dict[str, np.ndarray]],
                    threads: int | None = None) -> tuple[list[OutputAgreement], int]:
    """Cosine similarity, SQNR (dB) and max |error| of every graph output, accumulated over ``feeds``.

    Positions a feed's 2-D ``attention_mask`` marks as padding are left out of outputs laid out [batch, seq,
    ...]: their values are the padding's, and a fused attention may give them others (a left-padded position
    sees no key: FlashAttention's output is 0 there, the unfused graph's an average of masked keys)."""
    reference, candidate = create_session(original, threads), _runner(compiled, threads)
    names = [o.name for o in reference.get_outputs()]
    agreements = {name: _Agreement() for name in names}
    count = 0
    for feed in feeds:
        tokens = np.asarray(feed["attention_mask"]) != 0 if np.ndim(feed.get("attention_mask")) == 2 else None
        for name, a, b in zip(names, reference.run(names, feed), candidate.run(names, feed), strict=True):
            if tokens is not None and a.shape[:2] == tokens.shape:
                a, b = a[tokens], b[tokens]
            agreements[name].add(a, b)
        count += 1
    return [agreements[name].result(name) for name in names], count


def compare_decode_steps(original: Path, compiled: Path, feeds: Sequence[dict[str, np.ndarray]], caches: Sequence[str],
                         logits_name: str, threads: int | None = None, steps: int = 8) -> OutputAgreement | None:
    """The logits of the compiled model against the original's at each window's last ``steps`` tokens, fed one at a
    time through the KV cache after a prefill of the rest, each model carrying its own presents: what generation
    runs. ``caches`` are the models' cache inputs (``cache_inputs``) and the logits their first output. None
    without cache inputs, or for feeds whose caches are not empty or whose windows are not longer than ``steps``."""
    usable = [f for f in feeds if caches and f["input_ids"].shape[1] > steps
              and all(name in f and np.shape(f[name])[2] == 0 for name in caches)]
    if not usable:
        return None
    reference, candidate = create_session(original, threads), _runner(compiled, threads)
    agreement = _Agreement()
    for feed in usable:
        seq = feed["input_ids"].shape[1]
        bounds = [0, *range(seq - steps, seq + 1)]
        want, got = (logits_through_cache(lambda f, run=runner: run.run(None, f), feed, caches, bounds)[:, -steps:]
                     for runner in (reference, candidate))
        tokens = np.asarray(feed["attention_mask"])[:, -steps:] != 0 if np.ndim(feed.get("attention_mask")) == 2 else None
        agreement.add(*(want[tokens], got[tokens]) if tokens is not None else (want, got))
    return agreement.result(f"{logits_name} ({steps} decode steps through the KV cache)")


def lm_feeds(model: onnx.ModelProto, windows: np.ndarray) -> list[dict[str, np.ndarray]]:
    """One feed per token window for a language model taking input_ids (+ attention_mask, position_ids,
    and a KV cache: float inputs [batch, heads, past, head_dim] with static heads and head_dim, as
    ``past_key_values.*`` are exported; each window is a prefill, so they are fed empty).

    Raises:
        QCompileError: the model has inputs other than these, so text cannot drive it.
    """
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    known = {"input_ids", "attention_mask", "position_ids"}
    cached = cache_inputs(model)
    caches = {i.name: _cache_shape(i) for i in inputs if i.name in cached}
    names = [i.name for i in inputs]
    if "input_ids" not in names or set(names) - known - set(caches):
        raise QCompileError(f"text calibration/evaluation needs a model whose inputs are input_ids [+ attention_mask, "
                            f"position_ids, a KV cache]; this one has {names}: pass --calib arrays instead")
    feeds = []
    for window in windows:
        ids = window[None, :].astype(np.int64)
        feed = {"input_ids": ids}
        if "attention_mask" in names:
            feed["attention_mask"] = np.ones_like(ids)
        if "position_ids" in names:
            feed["position_ids"] = np.arange(ids.shape[1], dtype=np.int64)[None, :]
        for name, (heads, head_dim, dtype) in caches.items():
            feed[name] = np.zeros((1, heads, 0, head_dim), dtype)
        feeds.append(feed)
    return feeds


def logits_through_cache(outputs_of: Callable[[dict[str, np.ndarray]], Sequence[np.ndarray]], feed: dict[str, np.ndarray],
                         caches: Sequence[str], bounds: Sequence[int]) -> np.ndarray:
    """Logits [batch, seq, vocab] of a window fed in steps over a KV cache, as generation feeds it.

    ``feed`` is the whole window as one prefill (``lm_feeds``: its caches empty); ``caches`` names its cache
    inputs, and ``outputs_of(step)`` returns the logits then the presents in that order. Step n takes the
    tokens ``bounds[n]:bounds[n + 1]`` (bounds rise from 0 to seq), the attention_mask's first
    ``bounds[n + 1]`` columns and the previous step's presents.
    """
    if list(bounds) != sorted(set(bounds)) or bounds[0] != 0 or bounds[-1] != feed["input_ids"].shape[1]:
        raise ValueError(f"logits_through_cache: bounds must rise from 0 to the window's length, got {list(bounds)}")
    past = {name: feed[name] for name in caches}
    logits = []
    for begin, end in zip(bounds, bounds[1:], strict=False):
        step = {"input_ids": feed["input_ids"][:, begin:end], **past}
        if "attention_mask" in feed:
            step["attention_mask"] = feed["attention_mask"][:, :end]
        if "position_ids" in feed:
            step["position_ids"] = feed["position_ids"][:, begin:end]
        out = outputs_of(step)
        past = dict(zip(caches, out[1:], strict=True))
        logits.append(out[0])
    return np.concatenate(logits, axis=1)


def cache_inputs(model: onnx.ModelProto) -> list[str]:
    """The KV-cache inputs of a language model: float inputs [batch, heads, past, head_dim] with static heads and
    head_dim and a named ``past`` axis, other than input_ids / attention_mask / position_ids."""
    initializers = {t.name for t in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in initializers
            and i.name not in ("input_ids", "attention_mask", "position_ids") and _cache_shape(i) is not None]


def _cache_shape(value: onnx.ValueInfoProto) -> tuple[int, int, np.dtype] | None:
    """(heads, head_dim, dtype) of a KV-cache input [batch, heads, past, head_dim], else None."""
    tensor = value.type.tensor_type
    dims = tensor.shape.dim
    if tensor.elem_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16) or len(dims) != 4:
        return None
    if not (dims[1].dim_value and dims[3].dim_value and dims[2].dim_param):
        return None
    return dims[1].dim_value, dims[3].dim_value, onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)


def perplexity(model_path: Path, feeds: Sequence[dict[str, np.ndarray]], logits_name: str | None = None,
               threads: int | None = None) -> float:
    """exp(mean next-token negative log-likelihood) over all windows (token t+1 predicted from <= t)."""
    session = _runner(model_path, threads)
    name = logits_name or (session.get_outputs()[0].name if hasattr(session, "get_outputs") else session.output_names[0])
    return perplexity_of(lambda feed: session.run([name], feed)[0], feeds, name)


def perplexity_of(logits_of: Callable[[dict[str, np.ndarray]], np.ndarray], feeds: Sequence[dict[str, np.ndarray]],
                  name: str = "logits") -> float:
    """:func:`perplexity` of any runner: ``logits_of(feed)`` returns logits [batch, seq, vocab]."""
    total_nll, total_tokens = 0.0, 0
    for feed in feeds:
        logits = np.asarray(logits_of(feed), np.float64)
        ids = feed["input_ids"]
        if logits.ndim != 3 or logits.shape[:2] != ids.shape:
            raise QCompileError(f"output {name} has shape {logits.shape}; perplexity needs logits [batch, seq, vocab]")
        shifted = logits[:, :-1, :]
        peak = shifted.max(axis=-1, keepdims=True)
        log_norm = np.log(np.exp(shifted - peak).sum(axis=-1)) + peak[..., 0]
        target = np.take_along_axis(shifted, ids[:, 1:, None], axis=-1)[..., 0]
        total_nll += float(np.sum(log_norm - target))
        total_tokens += target.size
    return math.exp(total_nll / max(total_tokens, 1))


def layer_sqnr(original: onnx.ModelProto, compiled: onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[LayerError]:
    """SQNR of every GEMM output of the original that still exists (same name) in the compiled model."""
    compiled_tensors = {o for n in compiled.graph.node for o in n.output}
    initializers = {t.name for t in original.graph.initializer}
    gemm_outputs = [(n.output[0], n.op_type) for n in original.graph.node
                    if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 and n.input[1] in initializers
                    and n.output[0] in compiled_tensors]
    if not gemm_outputs:
        return []
    names = [name for name, _ in gemm_outputs]
    reference = _session(original, names).run(names, feed)
    candidate = _session(compiled, names).run(names, feed)
    layers = []
    for (name, op), a, b in zip(gemm_outputs, reference, candidate, strict=True):
        a, b = a.astype(np.float64), b.astype(np.float64)
        layers.append(LayerError(name, op, _db(float(np.sum(a * a)), float(np.sum((a - b) ** 2)))))
    return layers


def latency_pair(original: Path, compiled: Path, feed: dict[str, np.ndarray], threads: int | None,
                 repeats: int = 10) -> tuple[float, float]:
    """Median latency (ms) of both models, measured alternately so drift hits both equally."""
    reference, candidate = create_session(original, threads), create_session(compiled, threads)
    a, b = [], []
    for _ in range(3):
        a.append(measure_latency(reference, feed, warmup=1, repeats=max(1, repeats // 3)))
        b.append(measure_latency(candidate, feed, warmup=1, repeats=max(1, repeats // 3)))
    return float(np.median(a)), float(np.median(b))
