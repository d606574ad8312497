"""The summary table (stdout) and the report file (Markdown or JSON) of a compile run."""

from __future__ import annotations

import json
import math
from pathlib import Path

from qcompiler.errors import OutputPathError

__all__ = ["summary_markdown", "write_report"]

_WORST_LAYERS = 10


def _fmt(value, digits=3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isinf(value):
            return "inf"
        return f"{value:.{digits}f}"
    return str(value)


def _float_columns_table(result) -> list[str]:
    """Per split activation: the GEMMs reading it and how many of its K input columns stay in float."""
    split = next((r.result for r in result.records if r.name == "outlier_split" and r.result.details), None)
    if split is None:
        return []
    by_activation: dict[str, list[dict]] = {}
    for detail in split.details:
        by_activation.setdefault(detail["activation"], []).append(detail)
    lines = ["", "Input columns kept in float by OutlierSplit (the rest go W8A8):", "",
             "| activation | GEMMs | K | float columns | max outlier token fraction |", "|---|---|---|---|---|"]
    for activation, details in by_activation.items():
        first = details[0]
        lines.append(f"| {activation} | {', '.join(d['node'] for d in details)} | {first['k']} | "
                     f"{first['float_columns']} | {_fmt(first['max_outlier_fraction'], 4)} |")
    return lines


def summary_markdown(result, *, details: bool = False) -> str:
    """Markdown tables: passes, output agreement, perplexity and latency, the worst layers; with
    ``details``, also the float columns OutlierSplit kept per activation (one row per split tensor)."""
    lines = [f"## qcompile: recipe `{result.recipe.name}` -> `{result.output}`", "",
             "| # | pass | seconds | result |", "|---|---|---|---|"]
    for r in result.records:
        lines.append(f"| {r.index} | {r.name} | {r.seconds:.2f} | {r.result.summary or ('changed' if r.result.changed else 'no change')} |")
    if details:
        lines += _float_columns_table(result)
    ev = result.evaluation
    if ev is None:
        return "\n".join(lines) + "\n"
    lines += ["", f"Outputs, compiled vs original, over {ev.samples} held-out samples:", "",
              "| output | cosine | SQNR dB | max abs error |", "|---|---|---|---|"]
    for o in ev.outputs:
        lines.append(f"| {o.name} | {_fmt(o.cosine, 5)} | {_fmt(o.sqnr_db, 1)} | {_fmt(o.max_abs_error, 4)} |")
    metrics = []
    if ev.perplexity_original is not None:
        ratio = ev.perplexity_compiled / ev.perplexity_original
        metrics.append(f"| perplexity ({ev.perplexity_windows} windows) | {_fmt(ev.perplexity_original)} | "
                       f"{_fmt(ev.perplexity_compiled)} | {ratio:.4f} |")
    if ev.latency_compiled_ms is not None:
        shape = ", ".join(f"{k}:{'x'.join(map(str, v))}" for k, v in ev.latency_shape.items())
        metrics.append(f"| latency ms, ORT CPU, {ev.threads} threads ({shape}) | {_fmt(ev.latency_original_ms, 1)} | "
                       f"{_fmt(ev.latency_compiled_ms, 1)} | speedup {_fmt(ev.speedup, 2)}x |")
    if metrics:
        lines += ["", "| metric | original | compiled | ratio |", "|---|---|---|---|", *metrics]
    if ev.latency_compiled_ms is None:
        lines += ["", "Latency not measured: the compiled graph holds TensorRT plugin ops, which ONNX Runtime cannot run "
                      "(the figures above come from the ops' numpy references)."]
    if ev.layers:
        worst = sorted(ev.layers, key=lambda layer: layer.sqnr_db)[:_WORST_LAYERS]
        lines += ["", f"Lowest-SQNR GEMM outputs (of {len(ev.layers)}; errors accumulate through the network):", "",
                  "| tensor | op | SQNR dB |", "|---|---|---|"]
        lines += [f"| {layer.tensor} | {layer.op} | {_fmt(layer.sqnr_db, 1)} |" for layer in worst]
    return "\n".join(lines) + "\n"


def write_report(result, path: str | Path) -> None:
    """Writes ``.json`` (everything, incl. per-layer SQNR of all GEMMs) or Markdown (anything else,
    with the per-activation float-column table of OutlierSplit)."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".json":
            path.write_text(json.dumps(result.to_dict(), indent=2, default=str))
        else:
            path.write_text(summary_markdown(result, details=True))
    except OSError as err:
        raise OutputPathError(f"cannot write report {path}: {err.strerror or err}") from None
