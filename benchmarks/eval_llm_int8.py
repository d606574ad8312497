"""LLM.int8() outlier split on SmolLM2-135M: perplexity against fp32 for outlier thresholds, plus the
two reference points that bound it (per-token W8A8 with no split; int8 weights alone).

Each row compiles the model with the `llm-int8` recipe and one OutlierSplit setting (absolute
threshold and token fraction, optionally the relative rule k x token RMS), calibrating on State of
the Union text and measuring perplexity on held-out Jane Austen; the table gives the float columns
the split keeps. "weights only" is per-channel int8 weights with fp32 activations (MatMulNBits,
accuracy_level 1): the part of the error no activation treatment can remove.

    python benchmarks/eval_llm_int8.py [--work work] [--calib-windows 32] [--eval-windows 16]
        [--variants recipe 6:0 6:0.001 4:0 3:0 6:0:1 6:0:0.1:6:0.01 none weights]
    (variant: threshold:min_token_fraction[:max_float_fraction[:relative_threshold:relative_min_token_fraction]];
     "recipe" is the llm-int8 recipe as shipped)
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import qcompiler
from qcompiler.config import OutlierSplitConfig, Recipe, WeightOnlyConfig
from qcompiler.models.smollm2 import cached_smollm2
from qcompiler.recipes import BUILTIN_RECIPES

DATA = Path(__file__).resolve().parent.parent / "data"


def _recipe(variant: str) -> tuple[str, Recipe]:
    base = BUILTIN_RECIPES["llm-int8"]
    if variant == "none":
        return "per-token W8A8, no split", dataclasses.replace(base, name="w8a8-per-token", outlier_split=None)
    if variant == "recipe":
        return _label(base.outlier_split) + " (recipe)", base
    if variant == "weights":
        return "int8 weights only (fp32 activations)", Recipe(
            "w8-weights-only", weight_only=WeightOnlyConfig(bits=8, group_size=None, accuracy_level=1))
    fields = [float(v) for v in variant.split(":")]
    if len(fields) not in (2, 3, 5):
        raise SystemExit(f"bad variant {variant!r}: threshold:fraction[:cap[:relative_threshold:relative_fraction]]")
    split = OutlierSplitConfig(threshold=fields[0], min_token_fraction=fields[1],
                               max_float_fraction=fields[2] if len(fields) > 2 else 0.1,
                               relative_threshold=fields[3] if len(fields) > 3 else None,
                               relative_min_token_fraction=fields[4] if len(fields) > 3 else 0.01)
    return _label(split), dataclasses.replace(base, name="llm-int8-" + variant.replace(":", "_"), outlier_split=split)


def _label(split: OutlierSplitConfig) -> str:
    label = f"\\|x\\| > {split.threshold:g} in >= {split.min_token_fraction:g} of tokens"
    if split.relative_threshold is not None:
        label += f", or > {split.relative_threshold:g} x token RMS in >= {split.relative_min_token_fraction:g}"
    return label + f"; <= {split.max_float_fraction:g} of K in float"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("work"))
    parser.add_argument("--calib-windows", type=int, default=32)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--variants", nargs="+",
                        default=["recipe", "6:0", "6:0.001", "4:0", "3:0", "6:0:0.1:6:0.01", "none", "weights"])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    model, tokenizer = cached_smollm2(args.work / "smollm2")
    lines = ["| setting | ppl | fp32 | vs fp32 | float columns | compile s |", "|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    data = qcompiler.DataOptions(calib_text=DATA / "sotu_calibration.txt", tokenizer=tokenizer,
                                 seq_len=args.seq_len, num_samples=args.calib_windows)
    evaluate = qcompiler.EvalOptions(eval_text=DATA / "austen_heldout.txt", eval_windows=args.eval_windows,
                                     layer_report=False, latency_repeats=1, threads=2)
    for variant in args.variants:
        label, recipe = _recipe(variant)
        start = time.perf_counter()
        result = qcompiler.compile(model, args.work / f"{model.stem}.{recipe.name}.onnx", recipe, data=data,
                                   evaluate=evaluate)
        seconds = time.perf_counter() - start
        ev = result.evaluation
        split = next((r.result for r in result.records if r.name == "outlier_split"), None)
        columns = sum(d["float_columns"] for d in split.details) if split else 0
        line = (f"| {label} | {ev.perplexity_compiled:.3f} | {ev.perplexity_original:.3f} | "
                f"{100 * (ev.perplexity_compiled / ev.perplexity_original - 1):+.2f}% | {columns} | {seconds:.0f} |")
        lines.append(line)
        print(line, flush=True)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
