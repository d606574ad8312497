"""INT4 weight-only GEMM (g128, symmetric) vs torch fp16 ``F.linear``, measured side by side.

Prints µs, TFLOPS and effective weight bandwidth (packed INT4 bytes + scales / time) for
M in {1, 4, 16, 64, 256, 1024, 4096} x (N, K) in {(4096, 4096), (11008, 4096), (4096, 11008), (28672, 8192)}.
Timing: triton.testing.do_bench, median, which clears L2 (a 256 MB write) before every repetition so
weights stream from HBM in both columns. ``--sweep`` times a list of tactics per point instead.

    python benchmarks/bench_int4_gemm.py [--ms 1,4,16] [--sweep] [--out results.md]
"""

# ruff: noqa: B023  (each lambda is timed inside the iteration that defines it)
from __future__ import annotations

import argparse
import itertools
import sys

import torch
import triton

from qcompiler.plugins.int4_gemm import Int4GemmConfig, int4_gemm, pick_int4_config
from qcompiler.plugins.ops import pack_int4_matmulnbits

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (28672, 8192)]
MS = [1, 4, 16, 64, 256, 1024, 4096]
BLOCK = 128


def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3  # µs


def sweep_configs(M):
    # SWAP_AB (weight as the register A operand) is left out: Triton 3.6 then loads the packed bytes
    # one byte at a time (cp.async.ca of 1 B in the PTX), see gpu_notes.md.
    if M <= 16:
        for bn, bk, split, st in itertools.product((16, 32, 64, 128), (256, 512), (False, True), (3, 4)):
            yield Int4GemmConfig(16, bn, bk, 4, st, False, split)
        for bn, bk, w, st in itertools.product((32, 64, 128), (128, 256, 1024), (2, 8), (2, 5)):
            yield Int4GemmConfig(16, bn, bk, w, st, False, False)
    elif M <= 128:
        for bm, bn, bk, split in itertools.product((32, 64), (64, 128), (128, 256), (False, True)):
            yield Int4GemmConfig(bm, bn, bk, 4, 4, False, split)
    else:
        for (bm, bn, bk, w, st), split in itertools.product(
                [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 128, 8, 3),
                 (128, 256, 128, 8, 3), (64, 256, 64, 4, 4)], (False, True)):
            yield Int4GemmConfig(bm, bn, bk, w, st, False, split)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--shapes", default=None, help="N:K,N:K")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    ms = [int(m) for m in args.ms.split(",")]
    shapes = [tuple(map(int, s.split(":"))) for s in args.shapes.split(",")] if args.shapes else SHAPES
    torch.manual_seed(0)
    lines = [f"# INT4 GEMM (g{BLOCK}, sym) vs torch fp16 on {torch.cuda.get_device_name()}", "",
             "| M | N | K | fp16 µs | int4 µs | speedup | int4 TFLOPS | int4 weight TB/s | fp16 weight TB/s | tactic |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for (N, K), M in itertools.product(shapes, ms):
        w = torch.randn(N, K, device="cuda") * 0.02
        b, s, _ = pack_int4_matmulnbits(w, BLOCK, scale_dtype=torch.float16)
        w16 = w.half()
        x = torch.randn(M, K, device="cuda", dtype=torch.float16)
        t16 = bench(lambda: torch.nn.functional.linear(x, w16))
        wbytes = b.numel() + s.numel() * 2
        if args.sweep:
            best = None
            for cfg in sweep_configs(M):
                try:
                    t = bench(lambda: int4_gemm(x, b, s, block_size=BLOCK, config=cfg))
                except Exception as err:  # a tactic that does not fit shared memory
                    print(f"  skip {cfg}: {type(err).__name__}", file=sys.stderr)
                    continue
                if best is None or t < best[0]:
                    best = (t, cfg)
            t4, cfg = best
        else:
            cfg = pick_int4_config(M, N, K, BLOCK)
            t4 = bench(lambda: int4_gemm(x, b, s, block_size=BLOCK))
        flops = 2 * M * N * K
        row = (f"| {M} | {N} | {K} | {t16:.1f} | {t4:.1f} | {t16 / t4:.2f}x | {flops / t4 / 1e6:.1f} | "
               f"{wbytes / t4 / 1e6:.2f} | {N * K * 2 / t16 / 1e6:.2f} | "
               f"{cfg.BLOCK_M}x{cfg.BLOCK_N}x{cfg.BLOCK_K} w{cfg.num_warps} s{cfg.num_stages}"
               f"{' swap' if cfg.SWAP_AB else ''}{' splitx' if cfg.SPLIT_X else ''} |")
        lines.append(row)
        print(row, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
