"""LLM.int8() outlier split on SmolLM2-135M: perplexity against fp32 for outlier thresholds, plus the
two reference points that bound it (per-token W8A8 with no split; int8 weights alone).

Each row compiles the model with the `llm-int8` recipe and one OutlierSplit setting (threshold,
min_token_fraction), calibrating on State of the Union text and measuring perplexity on held-out Jane
Austen; the table gives the float columns the split keeps. "weights only" is per-channel int8 weights
with fp32 activations (MatMulNBits, accuracy_level 1): the part of the error no activation treatment
can remove.

    python benchmarks/eval_llm_int8.py [--work work] [--calib-windows 32] [--eval-windows 16]
        [--variants 6:0.001 6:0 4:0 3:0 6:0:1 none weights]   (threshold:min_token_fraction[:max_float_fraction])
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import qcompiler
from qcompiler.config import Recipe, WeightOnlyConfig
from qcompiler.models.smollm2 import cached_smollm2
from qcompiler.recipes import BUILTIN_RECIPES

DATA = Path(__file__).resolve().parent.parent / "data"


def _recipe(variant: str) -> tuple[str, Recipe]:
    base = BUILTIN_RECIPES["llm-int8"]
    if variant == "none":
        return "per-token W8A8, no split", dataclasses.replace(base, name="w8a8-per-token", outlier_split=None)
    if variant == "weights":
        return "int8 weights only (fp32 activations)", Recipe(
            "w8-weights-only", weight_only=WeightOnlyConfig(bits=8, group_size=None, accuracy_level=1))
    threshold, fraction, *cap = (float(v) for v in variant.split(":"))
    cap = cap[0] if cap else base.outlier_split.max_float_fraction
    split = dataclasses.replace(base.outlier_split, threshold=threshold, min_token_fraction=fraction,
                                max_float_fraction=cap)
    return (f"llm-int8, \\|x\\| > {threshold:g} in >= {fraction:g} of tokens, <= {cap:g} of K in float",
            dataclasses.replace(base, name=f"llm-int8-t{threshold:g}-f{fraction:g}-c{cap:g}", outlier_split=split))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("work"))
    parser.add_argument("--calib-windows", type=int, default=32)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--variants", nargs="+", default=["6:0.001", "6:0", "4:0", "3:0", "6:0:1", "none", "weights"])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    model, tokenizer = cached_smollm2(args.work / "smollm2")
    lines = ["| setting | ppl | fp32 | vs fp32 | float columns | compile s |", "|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for variant in args.variants:
        label, recipe = _recipe(variant)
        data = qcompiler.DataOptions(calib_text=DATA / "sotu_calibration.txt", tokenizer=tokenizer,
                                     seq_len=args.seq_len, num_samples=args.calib_windows)
        evaluate = qcompiler.EvalOptions(eval_text=DATA / "austen_heldout.txt", eval_windows=args.eval_windows,
                                         layer_report=False, latency_repeats=1, threads=2)
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
