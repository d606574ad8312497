"""Calibration: feed data in, streaming statistics out.

Samples are run through ONNX Runtime a batch at a time with the tensors of interest exposed as extra
graph outputs; each batch's activations are folded into running statistics and dropped, so memory is
bounded by one batch's activations whatever the number of samples (ONNX Runtime's own calibrator keeps
them all, which is what runs LLMs out of memory).

Statistics per tensor (channel = last axis, token = every other position):
  * ``channel_absmax`` max|x_j| over tokens           (SmoothQuant, per-tensor max ranges)
  * ``min`` / ``max`` over everything                 (asymmetric ranges)
  * ``histogram`` of |x| in fixed log-spaced bins     (percentile ranges; fixed bins merge exactly)
  * ``outlier_tokens`` per-channel count of tokens with |x_j| > threshold (LLM.int8() split)
  * ``relative_outlier_tokens`` per-channel count of tokens t with |x_tj| > k · rms(x_t), when a
    relative threshold k is given (scale-free outlier features)
  * ``tokens`` number of tokens seen
They are saved to / loaded from ``.npz`` keyed ``<tensor>::<field>``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from qcompiler.errors import CalibrationDataError

__all__ = [
    "TensorStats", "CalibrationStats", "load_calibration_arrays", "iterate_feeds", "collect_stats",
    "collect_activation_samples",
    "HISTOGRAM_RANGE", "ORT_TO_NUMPY",
]

logger = logging.getLogger(__name__)

# |x| histogram spans 1e-8 .. 1e8 in log space; below the range counts into the first bin.
HISTOGRAM_RANGE = (-8.0, 8.0)

ORT_TO_NUMPY = {
    onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16, onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.INT64: np.int64, onnx.TensorProto.INT32: np.int32, onnx.TensorProto.INT8: np.int8,
    onnx.TensorProto.UINT8: np.uint8, onnx.TensorProto.BOOL: np.bool_,
}


@dataclass
class TensorStats:
    """Running statistics of one activation tensor."""

    channel_absmax: np.ndarray
    min: float
    max: float
    histogram: np.ndarray
    outlier_tokens: np.ndarray
    tokens: int
    outlier_threshold: float
    relative_outlier_tokens: np.ndarray | None = None
    relative_threshold: float | None = None

    @classmethod
    def empty(cls, channels: int, bins: int, outlier_threshold: float,
              relative_threshold: float | None = None) -> TensorStats:
        relative = np.zeros(channels, np.int64) if relative_threshold is not None else None
        return cls(np.zeros(channels, np.float32), np.inf, -np.inf, np.zeros(bins, np.int64),
                   np.zeros(channels, np.int64), 0, outlier_threshold, relative, relative_threshold)

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float32)
        if not np.all(np.isfinite(x)):
            raise CalibrationDataError("calibration produced NaN/Inf activations; check the calibration data and model")
        rows = x.reshape(-1, x.shape[-1]) if x.ndim > 1 else x.reshape(1, -1)
        absx = np.abs(rows)
        np.maximum(self.channel_absmax, absx.max(axis=0), out=self.channel_absmax)
        self.min = min(self.min, float(rows.min()))
        self.max = max(self.max, float(rows.max()))
        self.outlier_tokens += (absx > self.outlier_threshold).sum(axis=0)
        if self.relative_threshold is not None:
            rms = np.sqrt(np.mean(np.square(rows, dtype=np.float64), axis=1, keepdims=True))
            self.relative_outlier_tokens += (absx > self.relative_threshold * rms).sum(axis=0)
        self.tokens += rows.shape[0]
        bins = self.histogram.size
        lo, hi = HISTOGRAM_RANGE
        idx = ((np.log10(np.maximum(absx, 10.0 ** lo)) - lo) * (bins / (hi - lo))).astype(np.int64)
        self.histogram += np.bincount(np.clip(idx, 0, bins - 1).ravel(), minlength=bins)

    @property
    def absmax(self) -> float:
        return float(self.channel_absmax.max()) if self.channel_absmax.size else 0.0

    def percentile_absmax(self, percentile: float) -> float:
        """|x| below which ``percentile`` % of values fall (upper edge of the bin), capped at the max."""
        cumulative = np.cumsum(self.histogram)
        if cumulative[-1] == 0:
            return 0.0
        index = int(np.searchsorted(cumulative, cumulative[-1] * percentile / 100.0))
        lo, hi = HISTOGRAM_RANGE
        edge = 10.0 ** (lo + (index + 1) * (hi - lo) / self.histogram.size)
        return float(min(edge, self.absmax))

    def outlier_fraction(self) -> np.ndarray:
        """Per channel, the fraction of tokens with |x_j| > outlier_threshold."""
        return self.outlier_tokens / max(self.tokens, 1)

    def relative_outlier_fraction(self) -> np.ndarray | None:
        """Per channel, the fraction of tokens t with |x_tj| > relative_threshold · rms(x_t) (None: not counted)."""
        if self.relative_outlier_tokens is None:
            return None
        return self.relative_outlier_tokens / max(self.tokens, 1)


@dataclass
class CalibrationStats:
    """Statistics for many tensors, keyed by tensor name."""

    tensors: dict[str, TensorStats] = field(default_factory=dict)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __getitem__(self, name: str) -> TensorStats:
        return self.tensors[name]

    def get(self, name: str) -> TensorStats | None:
        return self.tensors.get(name)

    def save(self, path: str | Path) -> None:
        arrays = {}
        for name, s in self.tensors.items():
            arrays[f"{name}::channel_absmax"] = s.channel_absmax
            arrays[f"{name}::minmax"] = np.array([s.min, s.max], np.float64)
            arrays[f"{name}::histogram"] = s.histogram
            arrays[f"{name}::outlier_tokens"] = s.outlier_tokens
            relative = np.nan if s.relative_threshold is None else s.relative_threshold
            arrays[f"{name}::tokens"] = np.array([s.tokens, s.outlier_threshold, relative], np.float64)
            if s.relative_outlier_tokens is not None:
                arrays[f"{name}::relative_outlier_tokens"] = s.relative_outlier_tokens
        np.savez_compressed(path, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> CalibrationStats:
        try:
            data = np.load(path)
        except (OSError, ValueError) as err:
            raise CalibrationDataError(f"cannot read statistics file {path}: {err}") from None
        stats = cls()
        names = {k.rsplit("::", 1)[0] for k in data.files}
        try:
            for name in names:
                minmax = data[f"{name}::minmax"]
                tokens = data[f"{name}::tokens"]
                relative = float(tokens[2]) if tokens.size > 2 and np.isfinite(tokens[2]) else None
                stats.tensors[name] = TensorStats(
                    data[f"{name}::channel_absmax"].astype(np.float32), float(minmax[0]), float(minmax[1]),
                    data[f"{name}::histogram"].astype(np.int64), data[f"{name}::outlier_tokens"].astype(np.int64),
                    int(tokens[0]), float(tokens[1]),
                    data[f"{name}::relative_outlier_tokens"].astype(np.int64) if relative is not None else None,
                    relative)
        except KeyError as err:
            raise CalibrationDataError(f"{path} is not a qcompiler statistics file (missing {err})") from None
        return stats


def _input_specs(model: onnx.ModelProto) -> dict[str, tuple[type, list]]:
    initializers = {t.name for t in model.graph.initializer}
    specs = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]
        specs[value.name] = (ORT_TO_NUMPY.get(tensor_type.elem_type), dims)
    return specs


def load_calibration_arrays(path: str | Path, model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Reads an ``.npz`` (or a folder of them, concatenated on axis 0) and checks it against the model.

    Arrays are keyed by model input name, shaped like that input with samples stacked on axis 0.

    Raises:
        CalibrationDataError: missing/unknown names, wrong rank, fixed dims or dtype, NaN/Inf, unequal counts.
    """
    path = Path(path)
    files = sorted(path.glob("*.npz")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise CalibrationDataError(f"calibration data not found: {path} (expected an .npz or a folder of .npz)")
    parts: dict[str, list[np.ndarray]] = {}
    for f in files:
        try:
            with np.load(f, allow_pickle=False) as data:
                for key in data.files:
                    parts.setdefault(key, []).append(data[key])
        except Exception as err:
            raise CalibrationDataError(f"cannot read calibration file {f}: {err}") from None
    specs = _input_specs(model)
    missing = sorted(set(specs) - set(parts))
    unknown = sorted(set(parts) - set(specs))
    if missing or unknown:
        raise CalibrationDataError(
            f"calibration arrays must be keyed by the model's input names {sorted(specs)}; "
            f"missing {missing}, unknown {unknown}")
    arrays = {}
    for name, chunks in parts.items():
        dtype, dims = specs[name]
        try:
            array = np.concatenate(chunks, axis=0)
        except ValueError as err:
            raise CalibrationDataError(f"calibration input {name!r}: files disagree in shape ({err})") from None
        if array.ndim != len(dims):
            raise CalibrationDataError(f"calibration input {name!r} has shape {array.shape}, model expects rank {len(dims)} {dims}")
        for axis, (got, want) in enumerate(zip(array.shape, dims, strict=True)):
            if axis > 0 and want is not None and got != want:
                raise CalibrationDataError(f"calibration input {name!r} has shape {array.shape}, model expects {dims}")
        if dtype is not None and array.dtype != dtype:
            if np.issubdtype(array.dtype, np.floating) != np.issubdtype(dtype, np.floating) or array.dtype.kind == "b":
                raise CalibrationDataError(f"calibration input {name!r} has dtype {array.dtype}, model expects {np.dtype(dtype).name}")
            array = array.astype(dtype)
        if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
            raise CalibrationDataError(f"calibration input {name!r} contains NaN or Inf")
        arrays[name] = array
    counts = {name: a.shape[0] for name, a in arrays.items()}
    if len(set(counts.values())) > 1:
        raise CalibrationDataError(f"calibration inputs have different sample counts {counts}")
    return arrays


def iterate_feeds(arrays: dict[str, np.ndarray], batch: int = 1, num_samples: int | None = None
                  ) -> Callable[[], Iterator[dict[str, np.ndarray]]]:
    """Returns a factory of fresh iterators over feed dicts of ``batch`` rows each."""
    total = next(iter(arrays.values())).shape[0]
    total = min(total, num_samples) if num_samples else total

    def feeds() -> Iterator[dict[str, np.ndarray]]:
        for start in range(0, total, batch):
            yield {name: a[start:min(start + batch, total)] for name, a in arrays.items()}

    feeds.num_batches = (total + batch - 1) // batch  # type: ignore[attr-defined]
    return feeds


def _session(model: onnx.ModelProto, extra_outputs: Sequence[str], threads: int | None = None):
    import onnxruntime as ort

    model = onnx.ModelProto.FromString(model.SerializeToString()) if extra_outputs else model
    existing = {o.name for o in model.graph.output}
    for name in extra_outputs:
        if name not in existing:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    # ORT never fuses away a node whose output is a graph output, so the requested tensors survive.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    payload = model.SerializeToString() if model.ByteSize() < 2_000_000_000 else None
    if payload is None:
        raise CalibrationDataError("models over 2 GB must be calibrated from a file path (not yet supported in memory)")
    return ort.InferenceSession(payload, options, providers=["CPUExecutionProvider"])


def collect_stats(model: onnx.ModelProto, tensor_names: Sequence[str],
                  feeds: Callable[[], Iterator[dict[str, np.ndarray]]], *, bins: int = 2048,
                  outlier_threshold: float = 6.0, relative_outlier_threshold: float | None = None,
                  show_progress: bool = False) -> CalibrationStats:
    """Runs every calibration batch and accumulates statistics of ``tensor_names``.

    Memory holds one batch's activations of the requested tensors at a time.
    """
    from tqdm import tqdm

    names = list(dict.fromkeys(tensor_names))
    stats = CalibrationStats()
    if not names:
        return stats
    session = _session(model, names)
    batches = feeds()
    total = getattr(feeds, "num_batches", None)
    for feed in tqdm(batches, total=total, desc="calibrating", unit="batch", disable=not show_progress, leave=False):
        try:
            values = session.run(names, feed)
        except Exception as err:
            raise CalibrationDataError(f"running calibration data through the model failed: {str(err).splitlines()[0]}") from None
        for name, value in zip(names, values, strict=True):
            if name not in stats.tensors:
                channels = value.shape[-1] if value.ndim else 1
                stats.tensors[name] = TensorStats.empty(channels, bins, outlier_threshold, relative_outlier_threshold)
            stats.tensors[name].update(value)
    return stats


def collect_activation_samples(model: onnx.ModelProto, tensor_names: Sequence[str],
                               feeds: Callable[[], Iterator[dict[str, np.ndarray]]], *, max_batches: int,
                               max_rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A random subsample of at most ``max_rows`` token rows ([rows, channels]) of each tensor.

    Used where a pass must score candidates on real activations (SmoothQuant's alpha search); the
    subsample keeps memory bounded by ``max_rows`` rows per tensor.
    """
    names = list(dict.fromkeys(tensor_names))
    if not names:
        return {}
    session = _session(model, names)
    rng = np.random.default_rng(seed)
    per_batch = max(1, max_rows // max_batches)
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for count, feed in enumerate(feeds()):
        if count >= max_batches:
            break
        for name, value in zip(names, session.run(names, feed), strict=True):
            rows = value.reshape(-1, value.shape[-1])
            pick = rng.choice(rows.shape[0], size=min(per_batch, rows.shape[0]), replace=False)
            parts[name].append(rows[np.sort(pick)].astype(np.float32))
    return {name: np.concatenate(chunks) for name, chunks in parts.items()}
