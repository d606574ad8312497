"""Does the way L2 is cleared before each timed call move the small-M INT4 ratios?

``triton.testing.do_bench`` (and so every table in benchmarks/results) clears L2 by zeroing a 256 MB buffer, which
leaves L2 full of dirty lines: the timed kernel's reads then also write those lines back to HBM. This script times
torch fp16, a plain streaming read of the packed weight (read_floor.py's ``stream_read``) and the fastest small-M INT4
tactic at M = 1 and 16, each as a CUDA-graph replay (median of 200), after three clears side by side: ``write``
(zero 256 MB, as do_bench), ``read`` (sum a 256 MB buffer: L2 holds clean lines, as after a previous layer's
GEMM) and ``write+read``.

    python -m benchmarks.l2_flush [--shapes 11008:4096,...] [--out l2_flush.md]
"""

# ruff: noqa: B023  (each closure is timed inside the iteration that defines it)
from __future__ import annotations

import numpy as np
import torch

from benchmarks.bench_int4_gemm import TACTICS, Table, _weights, fastest_tactic, require_cuda, shapes_and_out
from benchmarks.read_floor import read_kernels

CLEARS = ("write", "read", "write+read")


def main(argv=None):
    shapes, out = shapes_and_out(argv)
    require_cuda("l2_flush")
    write_buf = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    read_buf = torch.ones(64 << 20, dtype=torch.float32, device="cuda")
    sink = torch.empty((), device="cuda")

    def clear(mode):
        if mode in ("write", "write+read"):
            write_buf.zero_()
        if mode in ("read", "write+read"):
            torch.sum(read_buf, dim=0, out=sink)

    def time_us(fn, mode, rep=200):
        fn()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        for _ in range(10):
            clear(mode)
            graph.replay()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(rep)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(rep)]
        for start, end in zip(starts, ends, strict=True):
            clear(mode)
            start.record()
            graph.replay()
            end.record()
        torch.cuda.synchronize()
        return float(np.median([s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)])) * 1e3

    launch = read_kernels()
    table = Table([f"# fp16, a plain read and INT4 at small M after three L2 clears on {torch.cuda.get_device_name()}", "",
             "| N | K | M | L2 clear | fp16 µs | read µs | int4 µs | tactic | fp16 / read | fp16 / int4 |",
             "|---|---|---|---|---|---|---|---|---|---|"], out)
    for N, K in shapes:
        w, b, s = _weights(N, K)
        w16 = w.half()

        for M in (1, 16):
            x = torch.randn(M, K, device="cuda", dtype=torch.float16)
            names = [n for n in TACTICS if n.startswith(("mma", "m16")) or (M <= 4 and n.startswith("gemv"))]
            for mode in CLEARS:
                t16 = time_us(lambda: torch.nn.functional.linear(x, w16), mode)
                t_read = time_us(lambda: launch.stream(b), mode)
                best, t4 = fastest_tactic(names, x, b, s, timer=lambda fn: time_us(fn, mode))
                row = (f"| {N} | {K} | {M} | {mode} | {t16:.1f} | {t_read:.1f} | {t4:.1f} | {best} | "
                       f"{t16 / t_read:.2f}x | {t16 / t4:.2f}x |")
                table.add(row)
    table.write()


if __name__ == "__main__":
    main()
