"""The compile pipeline: model + recipe + data -> passes -> compiled model (+ evaluation).

``compile`` is the Python API behind the CLI; ``build_passes`` turns a recipe into the literal list
of passes it runs.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from qcompiler.calibration import CalibrationStats, iterate_feeds, load_calibration_arrays
from qcompiler.config import ActivationScheme, Recipe
from qcompiler.errors import CalibrationDataError, NothingToQuantizeError, OutputPathError, QCompileError
from qcompiler.evaluation import Evaluation, cache_inputs, compare_decode_steps, compare_outputs, latency_pair, layer_sqnr, lm_feeds, perplexity
from qcompiler.graph import export_graph, import_graph, load_model, save_model
from qcompiler.pass_manager import GraphPass, PassContext, PassManager, PassRecord
from qcompiler.recipes import load_recipe

__all__ = ["CompileResult", "DataOptions", "EvalOptions", "build_passes", "compile"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataOptions:
    """Where calibration samples come from: arrays (``calib``) or a text cut into token windows."""

    calib: str | Path | None = None
    calib_batch: int = 1
    calib_text: str | Path | None = None
    tokenizer: str | Path | None = None
    seq_len: int = 512
    num_samples: int | None = None
    stats: str | Path | None = None
    save_stats: str | Path | None = None


@dataclass(frozen=True)
class EvalOptions:
    """What to measure after compiling (``enabled=False`` skips all of it)."""

    enabled: bool = True
    eval_text: str | Path | None = None
    eval_windows: int = 16
    compare_samples: int = 4
    shapes: dict[str, list[int]] | None = None
    threads: int | None = None
    latency_repeats: int = 10
    layer_report: bool = True


@dataclass
class CompileResult:
    output: Path
    recipe: Recipe
    records: list[PassRecord] = field(default_factory=list)
    evaluation: Evaluation | None = None

    def to_dict(self) -> dict:
        return {
            "output": str(self.output), "recipe": self.recipe.to_dict(),
            "passes": [{"name": r.name, "seconds": r.seconds, "changed": r.result.changed, "summary": r.result.summary,
                        "details": r.result.details, "not_fired": [list(x) for x in r.result.not_fired]}
                       for r in self.records],
            "evaluation": self.evaluation.to_dict() if self.evaluation else None,
        }


def build_passes(recipe: Recipe, backend: str = "onnxruntime", *, have_stats: bool = False, plugins: bool = False,
                 max_seq_len: int = 4096) -> list[GraphPass]:
    """The literal pass list for ``recipe``. Calibrate steps sit where statistics must be (re)taken.

    ``plugins`` (TensorRT backend) ends with the lowerings to qcompiler's plugin ops: 4-bit MatMulNBits
    to Int4Gemm, per-token W8A8 Q/DQ GEMMs to QuantizePerToken + W8A8Gemm, attention with a causal and/or
    key padding mask (checked up to ``max_seq_len``) to FlashAttention.
    """
    if plugins and backend != "tensorrt":
        raise QCompileError(f"plugin ops (--plugins) are TensorRT plugins: use --backend tensorrt, not {backend}")
    from qcompiler.passes.calibrate import Calibrate

    passes: list[GraphPass] = []
    threshold = recipe.outlier_split.threshold if recipe.outlier_split else 6.0
    relative = recipe.outlier_split.relative_threshold if recipe.outlier_split else None
    bins = recipe.calibration.histogram_bins
    needs_ranges = recipe.smoothquant or recipe.outlier_split or (
        recipe.w8a8 and recipe.w8a8.activation == ActivationScheme.PER_TENSOR_STATIC)
    if needs_ranges and not have_stats:
        passes.append(Calibrate(threshold, bins, relative))
    if recipe.smoothquant:
        from qcompiler.passes.smoothquant import SmoothQuant

        activation = recipe.w8a8.activation if recipe.w8a8 else ActivationScheme.PER_TOKEN_DYNAMIC
        passes.append(SmoothQuant(recipe.smoothquant, activation))
        if recipe.outlier_split or (recipe.w8a8 and recipe.w8a8.activation == ActivationScheme.PER_TENSOR_STATIC):
            passes.append(Calibrate(threshold, bins, relative))  # smoothing changed the activations
    if recipe.outlier_split:
        from qcompiler.passes.outlier_split import OutlierSplit

        passes.append(OutlierSplit(recipe.outlier_split))
    if recipe.w8a8:
        from qcompiler.passes.fuse_quant import FuseQuant
        from qcompiler.passes.insert_qdq import InsertQDQ

        passes += [InsertQDQ(recipe.w8a8), FuseQuant(target=backend)]
    if recipe.weight_only:
        from qcompiler.passes.rtn import WeightOnlyRTN

        passes.append(WeightOnlyRTN(recipe.weight_only))
    if recipe.gptq:
        from qcompiler.passes.gptq import GPTQ

        passes.append(GPTQ(recipe.gptq))
    if plugins:
        from qcompiler.passes.fuse_attention import FuseAttention
        from qcompiler.passes.lower_int4_gemm import LowerInt4Gemm
        from qcompiler.passes.lower_w8a8_gemm import LowerW8A8Gemm

        passes += [LowerInt4Gemm(), LowerW8A8Gemm(), FuseAttention("plugin", max_seq_len=max_seq_len)]
    return passes


def _check_output_path(output: Path, model_path: Path) -> None:
    if output.resolve() == model_path.resolve():
        raise OutputPathError(f"output path {output} is the input model; choose another path (the input is never overwritten)")
    folder = output.parent
    if not folder.is_dir():
        raise OutputPathError(f"cannot write {output}: folder {folder} does not exist")
    if output.is_dir():
        raise OutputPathError(f"cannot write {output}: it is a folder")
    try:  # fail before the (possibly long) work, not after it; os.access says yes to root everywhere
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as err:
        raise OutputPathError(f"cannot write {output}: {err.strerror or err}") from None


def _text_windows(model: onnx.ModelProto, text: str | Path, tokenizer_path: str | Path | None, seq_len: int,
                  max_windows: int | None, fraction: tuple[float, float]) -> np.ndarray:
    from qcompiler.tokenization import load_tokenizer, text_windows

    if tokenizer_path is None:
        raise QCompileError("--calib-text/--eval-text need --tokenizer (a tokenizer.json or a .gguf file)")
    tokenizer = load_tokenizer(tokenizer_path)
    return text_windows(text, tokenizer, seq_len, max_windows=max_windows,
                        start_fraction=fraction[0], end_fraction=fraction[1])


def _same_file(a, b) -> bool:
    return a is not None and b is not None and Path(a).resolve() == Path(b).resolve()


def _calibration_source(model: onnx.ModelProto, data: DataOptions, recipe: Recipe, eval_text
                        ) -> Callable[[], Iterator[dict[str, np.ndarray]]] | None:
    num = data.num_samples or recipe.calibration.num_samples
    batch = data.calib_batch or recipe.calibration.batch
    if data.calib is not None and data.calib_text is not None:
        raise QCompileError("give either --calib arrays or --calib-text, not both")
    if data.calib is not None:
        arrays = load_calibration_arrays(data.calib, model)
    elif data.calib_text is not None:
        # Calibrating and evaluating on one file: calibrate on its first half, evaluate on the second.
        fraction = (0.0, 0.5) if _same_file(data.calib_text, eval_text) else (0.0, 1.0)
        windows = _text_windows(model, data.calib_text, data.tokenizer, data.seq_len, num, fraction)
        feeds = lm_feeds(model, windows)
        arrays = {k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]}
    else:
        return None
    return iterate_feeds(arrays, batch=batch, num_samples=num)


def _random_feed(model: onnx.ModelProto, shapes: dict[str, list[int]] | None, rng) -> dict[str, np.ndarray]:
    from qcompiler.calibration import ORT_TO_NUMPY

    initializers = {t.name for t in model.graph.initializer}
    feed = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                for d in value.type.tensor_type.shape.dim]
        if shapes and value.name in shapes:
            dims = shapes[value.name]
        if any(d is None for d in dims):
            raise QCompileError(f"input {value.name!r} has dynamic dims {dims}: give --shapes {value.name}:1x512 "
                                "(or evaluation data) to measure latency")
        dtype = ORT_TO_NUMPY.get(value.type.tensor_type.elem_type, np.float32)
        if np.issubdtype(dtype, np.integer):
            high = 2 if "mask" in value.name else 100
            feed[value.name] = (np.ones(dims) if "mask" in value.name else rng.integers(0, high, dims)).astype(dtype)
        else:
            feed[value.name] = rng.standard_normal(dims).astype(dtype)
    return feed


def _evaluate(original_path: Path, compiled_path: Path, original: onnx.ModelProto, reference: onnx.ModelProto,
              options: EvalOptions, data: DataOptions, calibration, plugin_graph: bool = False) -> Evaluation:
    evaluation = Evaluation(threads=options.threads or os.cpu_count())
    rng = np.random.default_rng(0)
    windows_feeds = None
    if options.eval_text is not None:
        fraction = (0.5, 1.0) if _same_file(options.eval_text, data.calib_text) else (0.0, 1.0)
        windows = _text_windows(original, options.eval_text, data.tokenizer, data.seq_len, options.eval_windows, fraction)
        windows_feeds = lm_feeds(original, windows)
        logger.info("perplexity on %d windows of %d tokens", len(windows_feeds), data.seq_len)
        evaluation.perplexity_original = perplexity(original_path, windows_feeds, threads=options.threads)
        evaluation.perplexity_compiled = perplexity(compiled_path, windows_feeds, threads=options.threads)
        evaluation.perplexity_windows = len(windows_feeds)
    if windows_feeds:
        compare = windows_feeds[:options.compare_samples]
    elif calibration is not None:
        compare = [f for _, f in zip(range(options.compare_samples), calibration(), strict=False)]
        logger.warning("no held-out data (--eval-text): comparing outputs on calibration samples")
    else:
        compare = [_random_feed(original, options.shapes, rng) for _ in range(options.compare_samples)]
    evaluation.outputs, evaluation.samples = compare_outputs(original_path, compiled_path, compare, options.threads)
    caches = cache_inputs(original)
    decode = caches and compare_decode_steps(original_path, compiled_path, compare, caches, original.graph.output[0].name,
                                             options.threads)
    if decode:  # a model with a KV cache: its windows also fed through the cache, as generation runs
        evaluation.outputs.append(decode)
    if plugin_graph:  # the plugin ops' numpy references say what the graph computes, not how fast TensorRT runs it
        return evaluation
    latency_feed = _random_feed(original, options.shapes, rng) if options.shapes else compare[0]
    evaluation.latency_shape = {k: list(v.shape) for k, v in latency_feed.items()}
    evaluation.latency_original_ms, evaluation.latency_compiled_ms = latency_pair(
        original_path, compiled_path, latency_feed, options.threads, options.latency_repeats)
    if options.layer_report:
        compiled = onnx.load(str(compiled_path))
        evaluation.layers = layer_sqnr(reference, compiled, compare[0])
    return evaluation


def compile(model: str | Path, output: str | Path, recipe: str | Path | Recipe = "w8a8-smoothquant", *,
            data: DataOptions = DataOptions(), evaluate: EvalOptions = EvalOptions(enabled=False),
            exclude: Sequence[str] = (), dump_dir: str | Path | None = None, backend: str = "onnxruntime",
            plugins: bool = False, max_seq_len: int = 4096, show_progress: bool = False) -> CompileResult:
    """Compiles ``model`` with ``recipe`` and writes ``output`` atomically; the input is never modified.

    With ``plugins`` (``backend="tensorrt"``) the graph ends in qcompiler's TensorRT plugin ops
    (:func:`build_passes`); ONNX Runtime cannot run it, so the evaluation computes its outputs and
    perplexity with the ops' numpy references and measures no latency.

    Raises:
        QCompileError (and subclasses): anything wrong with the inputs, with a one-line message.
    """
    model_path, output = Path(model), Path(output)
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    _check_output_path(output, model_path)
    try:
        patterns = [re.compile(p) for p in exclude]
    except re.error as err:
        raise QCompileError(f"invalid --exclude regex: {err}") from None
    original = load_model(model_path)
    calibration = _calibration_source(original, data, recipe, evaluate.eval_text if evaluate.enabled else None)
    stats = CalibrationStats.load(data.stats) if data.stats else None
    passes = build_passes(recipe, backend, have_stats=stats is not None, plugins=plugins, max_seq_len=max_seq_len)
    if any(p.name == "calibrate" for p in passes) and calibration is None:
        raise CalibrationDataError(f"recipe {recipe.name!r} needs calibration data: give --calib DATA, "
                                   "--calib-text FILE --tokenizer FILE, or --stats FILE")
    if recipe.gptq and calibration is None:
        raise CalibrationDataError(f"recipe {recipe.name!r} (GPTQ) needs calibration data")
    graph = import_graph(original)
    context = PassContext(stats=stats, calibration_feeds=calibration, exclude=patterns, show_progress=show_progress)
    # Passes that preserve the function come first; the graph after them is the reference for
    # per-layer errors (SmoothQuant rescales some GEMM outputs on purpose, e.g. V and up projections).
    exact_prefix = next((i for i, p in enumerate(passes) if not getattr(p, "exact", False)), len(passes))
    records = PassManager(passes[:exact_prefix], dump_dir=dump_dir).run(graph, context)
    reference = export_graph(graph) if exact_prefix else original
    records += PassManager(passes[exact_prefix:], dump_dir=dump_dir).run(graph, context, first_index=exact_prefix + 1)
    quantizing = [r for r in records if r.name not in ("calibrate", "smoothquant", "fuse_quant")]
    if recipe.name != "fp32" and quantizing and not any(r.result.changed for r in quantizing):
        reasons = "; ".join(f"{w}: {why}" for r in quantizing for w, why in r.result.not_fired[:3])
        raise NothingToQuantizeError(f"recipe {recipe.name!r} found nothing to quantize in {model_path}"
                                     + (f" ({reasons})" if reasons else ""))
    if data.save_stats and context.stats is not None:
        context.stats.save(data.save_stats)
    compiled = export_graph(graph)
    if compiled.ByteSize() < 2_000_000_000:  # the checker cannot take larger protos in memory
        onnx.checker.check_model(compiled)
    save_model(compiled, output, input_path=model_path)
    result = CompileResult(output, recipe, records)
    if evaluate.enabled:
        result.evaluation = _evaluate(model_path, output, original, reference, evaluate, data, calibration,
                                      plugin_graph=plugins)
    return result

