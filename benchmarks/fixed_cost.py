"""What one call costs beyond its bytes, and so what ratio fp16 / INT4 the timing here allows at small M.

A ratio such as fp16 / INT4 at M = 1 is the ratio of their bytes (~3.9x) only if neither call pays a cost
that does not scale with its bytes. For each benchmark shape (N, K) this script times, side by side in one
run and as every table here (CUDA-graph replay of one call, L2 cleared by a 256 MB write, median), at
N x {1/2, 5/8, 3/4, 7/8, 1} (multiples of 64 rows): torch fp16 ``F.linear`` at M = 1, read_floor.py's plain
streaming read of the packed weight (a fixed grid-stride grid, so only its bytes change with N), and the
fastest CUDA C++ INT4 tactic at M = 1 and at M = 16 (the Triton m16 tactics too at M = 16). It fits fp16 and
the read to ``µs = fixed + bytes / rate`` by least squares (fp16 reads 2NK bytes, the read the packed weight
and its scales) and prints the fixed µs, the marginal TB/s and the largest residual, then, at the shape
itself, fp16 / read (what an INT4 kernel exactly as fast as a plain read of its bytes would show) and
fp16 / INT4. The INT4 grids grow with N (fewer rows, fewer CTAs), so their times are listed per N against
the read's but not fitted.

    python -m benchmarks.fixed_cost [--shapes 11008:4096,...] [--out fixed_cost.md]
"""

# ruff: noqa: B023  (each closure is timed inside the iteration that defines it)
from __future__ import annotations

import numpy as np
import torch

from benchmarks.bench_int4_gemm import BLOCK, Table, _weights, bench, fastest_tactic, require_cuda, shapes_and_out
from benchmarks.read_floor import read_kernels, stream_read_us
from qcompiler.plugins.int4_gemm_mma import INT4_MMA_TACTICS

FRACTIONS = (0.5, 0.625, 0.75, 0.875, 1.0)


def fit_fixed_rate(nbytes, us) -> tuple[float, float, float]:
    """Least-squares ``us = fixed + nbytes / rate``: (fixed µs, rate in TB/s, largest |residual| in µs)."""
    nbytes, us = np.asarray(nbytes, dtype=np.float64), np.asarray(us, dtype=np.float64)
    if len(nbytes) < 2 or np.ptp(nbytes) == 0:
        raise ValueError("fit_fixed_rate: needs at least two different byte counts")
    slope, fixed = np.polyfit(nbytes, us, 1)
    residual = np.abs(us - (fixed + slope * nbytes)).max()
    return float(fixed), float(1e-6 / slope) if slope > 0 else float("inf"), float(residual)


def rows_for(N: int) -> list[int]:
    """The N of each fit point: fractions of N rounded down to 64 rows (the read kernels take 32-row CTAs)."""
    return sorted({max(64, int(N * f) // 64 * 64) for f in FRACTIONS})


def main(argv=None):
    shapes, out = shapes_and_out(argv)
    require_cuda("fixed_cost")
    launch = read_kernels()
    table = Table([f"# Fixed and per-byte cost of one call (g{BLOCK}) on {torch.cuda.get_device_name()}", "",
                   "fp16 and the plain read fitted over N x {1/2 .. 1} at fixed K: µs = fixed + bytes / rate. int4 = "
                   "fastest CUDA C++ tactic (at M = 16 also the Triton m16 tactics) at the shape's N.", "",
                   "| N | K | fp16 fixed µs | fp16 TB/s | fp16 max residual µs | read fixed µs | read TB/s | "
                   "read max residual µs | fp16 µs | read µs | int4 M=1 µs | int4 M=16 µs | fp16 / read | "
                   "fp16 / int4 M=1 | fp16 / int4 M=16 |",
                   "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"], out)
    detail = ["", "## Every timed point", "",
              "| N | K | fp16 µs | read µs | int4 M=1 µs | int4 M=16 µs | int4 M=1 / read | int4 M=16 / read | tactics |",
              "|---|---|---|---|---|---|---|---|---|"]
    for N_full, K in shapes:
        fp16_points, read_points = [], []
        for N in rows_for(N_full):
            w, b, s = _weights(N, K)
            w16 = w.half()
            del w
            x1 = torch.randn(1, K, device="cuda", dtype=torch.float16)
            x16 = torch.randn(16, K, device="cuda", dtype=torch.float16)
            t16 = bench(lambda: torch.nn.functional.linear(x1, w16))
            t_read = stream_read_us(launch, b)
            t4, picked = {}, []
            for M, x, extra in ((1, x1, ()), (16, x16, ("m16", "m16_n32", "m16_n64"))):
                name, t4[M] = fastest_tactic([*INT4_MMA_TACTICS, *extra], x, b, s)
                picked.append(name)
            fp16_points.append((2 * N * K, t16))
            read_points.append((b.numel() + s.numel() * s.element_size(), t_read))
            detail.append(f"| {N} | {K} | {t16:.1f} | {t_read:.1f} | {t4[1]:.1f} | {t4[16]:.1f} | "
                          f"{t4[1] / t_read:.2f} | {t4[16] / t_read:.2f} | {', '.join(picked)} |")
        fits = [fit_fixed_rate(*zip(*points, strict=True)) for points in (fp16_points, read_points)]
        cells = " | ".join(f"{fixed:.1f} | {rate:.2f} | {residual:.2f}" for fixed, rate, residual in fits)
        t16, t_read = fp16_points[-1][1], read_points[-1][1]
        table.add(f"| {N_full} | {K} | {cells} | {t16:.1f} | {t_read:.1f} | {t4[1]:.1f} | {t4[16]:.1f} | "
                  f"{t16 / t_read:.2f}x | {t16 / t4[1]:.2f}x | {t16 / t4[16]:.2f}x |")
    print("\n".join(detail))
    table.write(detail)


if __name__ == "__main__":
    main()
