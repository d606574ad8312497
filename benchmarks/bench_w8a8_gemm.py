"""W8A8 GEMM (fused per-token x per-channel dequant, fp16 out) vs torch fp16 and ``torch._int_mm``.

M in {256, 1024, 4096} x (N, K) in {(4096, 4096), (11008, 4096), (4096, 11008), (28672, 8192)}; µs and
TOPS of the torch wrapper's default tactic (``pick_w8a8_config``), every tactic of ``W8A8_TACTICS`` in
the detail section; ``_int_mm`` is timed alone (int32 out, no dequant), so it is a lower bound on
cuBLAS W8A8.
Also times the per-token quantize kernel fused with RMSNorm for the same M x K. Every callable is
captured in a CUDA graph and its replay timed (as in bench_int4_gemm.py).

    python benchmarks/bench_w8a8_gemm.py [--ms 256,1024,4096] [--sweep] [--out results.md]
"""

# ruff: noqa: B023  (each lambda is timed inside the iteration that defines it)
from __future__ import annotations

import argparse
import itertools
import sys

import torch
import triton

from qcompiler.plugins.quantize_per_token import NORM_RMS, quantize_per_token
from qcompiler.plugins.w8a8_gemm import W8A8_TACTICS, W8A8Config, pick_w8a8_config, w8a8_gemm

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (28672, 8192)]
MS = [256, 1024, 4096]


def bench(fn):
    """Median µs of a CUDA-graph replay of fn (L2 cleared before each replay by do_bench).

    Without the graph, host launch overhead (Python, Triton's launcher) leaked into the timing of the
    ~30 µs kernels: the same kernel measured 32.5 and 41.5 µs through two call paths in one run.
    """
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return triton.testing.do_bench(graph.replay, warmup=25, rep=100, return_mode="median") * 1e3


# 128x256 tiles hold a 128 KB int32 accumulator (one program per SM); Triton 3.6 waits for every int8
# wgmma before the next K step (wait_group 0 in the PTX), so the 128x128 tiles that let two or three
# programs share an SM (one computes while the other waits) are in the sweep too.
SWEEP = [W8A8Config(128, 256, 128, 8, 8, 3), W8A8Config(128, 128, 128, 8, 8, 4), W8A8Config(256, 128, 128, 8, 8, 3),
         W8A8Config(128, 256, 64, 8, 8, 4), W8A8Config(128, 128, 64, 8, 4, 4), W8A8Config(64, 256, 128, 8, 4, 4),
         W8A8Config(128, 128, 256, 8, 8, 3), W8A8Config(256, 128, 64, 8, 8, 4), W8A8Config(128, 128, 128, 8, 8, 3),
         W8A8Config(128, 128, 128, 8, 4, 3), W8A8Config(128, 128, 128, 8, 4, 2), W8A8Config(128, 128, 64, 8, 8, 4),
         W8A8Config(128, 128, 64, 8, 8, 3), W8A8Config(64, 128, 128, 8, 4, 4), W8A8Config(128, 256, 128, 8, 8, 2),
         W8A8Config(128, 128, 256, 8, 4, 2)]


def _desc(cfg):
    return f"{cfg.BLOCK_M}x{cfg.BLOCK_N}x{cfg.BLOCK_K} g{cfg.GROUP_M} w{cfg.num_warps} s{cfg.num_stages}"


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    lines = [f"# W8A8 GEMM vs torch fp16 / torch._int_mm on {torch.cuda.get_device_name()}", "",
             "| M | N | K | fp16 µs | _int_mm µs | w8a8 µs | vs fp16 | vs _int_mm | w8a8 TOPS | quant+RMSNorm µs | tactic |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    detail = ["", "## Every timed tactic", "", "| M | N | K | config | µs | vs fp16 |", "|---|---|---|---|---|---|"]
    for (N, K), M in itertools.product(SHAPES, [int(m) for m in args.ms.split(",")]):
        x16 = torch.randn(M, K, device="cuda", dtype=torch.float16)
        w16 = torch.randn(N, K, device="cuda", dtype=torch.float16)
        a = torch.randint(-127, 128, (M, K), device="cuda", dtype=torch.int8)
        b = torch.randint(-127, 128, (N, K), device="cuda", dtype=torch.int8)
        sa = torch.rand(M, device="cuda") * 1e-3
        sb = torch.rand(N, device="cuda") * 1e-3
        gamma = torch.rand(K, device="cuda", dtype=torch.float16)
        t16 = bench(lambda: torch.nn.functional.linear(x16, w16))
        bt = b.t()
        try:
            tint = bench(lambda: torch._int_mm(a, bt))
        except RuntimeError:
            tint = float("nan")
        if args.sweep:
            best = None
            for cfg in SWEEP:
                try:
                    t = bench(lambda: w8a8_gemm(a, b, sa, sb, config=cfg))
                except Exception as err:
                    print(f"  skip {cfg}: {type(err).__name__}", file=sys.stderr)
                    continue
                detail.append(f"| {M} | {N} | {K} | {_desc(cfg)} | {t:.1f} | {t16 / t:.2f}x |")
                if best is None or t < best[0]:
                    best = (t, cfg)
            t8, cfg = best
        else:
            # every tactic of the table (TensorRT's autotuner keeps the fastest); the row reports the
            # torch wrapper's pick, the detail section every tactic
            cfg = pick_w8a8_config(M, N, K)
            for name, tcfg in W8A8_TACTICS.items():
                t = bench(lambda: w8a8_gemm(a, b, sa, sb, config=tcfg))
                detail.append(f"| {M} | {N} | {K} | {name}: {_desc(tcfg)} | {t:.1f} | {t16 / t:.2f}x |")
            t8 = bench(lambda: w8a8_gemm(a, b, sa, sb))
        tq = bench(lambda: quantize_per_token(x16, gamma, norm=NORM_RMS))
        row = (f"| {M} | {N} | {K} | {t16:.1f} | {tint:.1f} | {t8:.1f} | {t16 / t8:.2f}x | {tint / t8:.2f}x | "
               f"{2 * M * N * K / t8 / 1e6:.0f} | {tq:.1f} | {_desc(cfg)} |")
        lines.append(row)
        print(row, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines + detail) + "\n")


if __name__ == "__main__":
    main()
