"""INT4 vs fp16 at prefill-sized M under sustained load: time per call, SM clock and board power.

The tables in benchmarks/results time one call at a time (do_bench: a CUDA-graph replay after an L2 clear, 100 ms
per kernel), so the GPU is rarely at its power limit for long, and where it gets there depends on what ran just
before. A prefill of a long prompt is the opposite: seconds of back-to-back GEMMs at the board's power limit
(700 W on the H100 SXM), where the SM clock falls to whatever that power buys. This script runs each kernel for
``--seconds`` as one CUDA graph of calls replayed back to back, cycling through enough weight copies that neither
weight stays in L2 between its calls, and samples ``nvidia-smi`` every 100 ms meanwhile. Rounds alternate fp16 and
INT4; the ratio is per round (each INT4 round against the fp16 round just before it).

    python -m benchmarks.sustained [--points 1024:11008:4096,...] [--tactic wgmma_128x256] [--out sustained.md]
"""

# ruff: noqa: B023  (each closure is run inside the iteration that defines it)
from __future__ import annotations

import argparse
import datetime
import math
import statistics
import subprocess
import time

import torch

from benchmarks.bench_int4_gemm import BLOCK, SHAPES, TACTICS, Table, _weights, graph_of, require_cuda
from qcompiler.plugins.int4_gemm import int4_gemm, pick_int4_config

L2_SPAN = 256 << 20  # bytes each kernel cycles through per graph, several times an H100's 50 MB L2
SMI_FIELDS = ("timestamp", "clocks.sm", "power.draw")


class SmiLog:
    """``nvidia-smi`` sampling clocks and power every 100 ms in the background; ``mean(t0, t1)`` averages a window."""

    def __init__(self):
        try:
            self.proc = subprocess.Popen(["nvidia-smi", f"--query-gpu={','.join(SMI_FIELDS)}",
                                          "--format=csv,noheader,nounits", "-lms", "100"],
                                         stdout=subprocess.PIPE, text=True)
        except FileNotFoundError:
            raise SystemExit("sustained: nvidia-smi not found (it samples the clock and power)") from None
        self.samples: list[tuple[float, float, float]] = []

    def stop(self):
        self.proc.terminate()
        for line in self.proc.stdout.read().splitlines():
            fields = [f.strip() for f in line.split(",")]
            try:  # nvidia-smi prints local time, as time.time() compares against after .timestamp()
                stamp = datetime.datetime.strptime(fields[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
                self.samples.append((stamp, float(fields[1]), float(fields[2])))
            except (ValueError, IndexError):  # "[N/A]" or a truncated last line
                continue

    def mean(self, t0: float, t1: float) -> tuple[float, float]:
        window = [(clock, power) for t, clock, power in self.samples if t0 <= t <= t1]
        if not window:
            return math.nan, math.nan
        return statistics.mean(c for c, _ in window), statistics.mean(p for _, p in window)


def sustained_us(calls, seconds: float) -> tuple[float, float, float]:
    """(µs per call, start, end of the steady window): ``calls`` (one per weight copy) captured once as a graph and
    replayed for ``seconds``; the first 0.5 s (clocks settling) is left out of the window the samples average."""
    graph = graph_of(calls)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0 = time.time()
    start.record()
    replays = 0
    while time.time() - t0 < seconds:
        graph.replay()
        replays += 1
        if replays % 4 == 0:  # keep the host at most a few replays ahead, so the wall clock tracks the GPU
            torch.cuda.synchronize()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (replays * len(calls)), t0 + 0.5, time.time() - 0.2


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--points", default=None, help="M:N:K,... (default: M 256, 1024, 4096 on the four shapes)")
    ap.add_argument("--tactic", default=None, help="an INT4 tactic name (default: the torch wrapper's pick)")
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    try:
        points = ([tuple(map(int, p.split(":"))) for p in args.points.split(",")] if args.points else
                  [(M, N, K) for N, K in SHAPES for M in (256, 1024, 4096)])
    except ValueError:
        raise SystemExit(f"sustained: --points wants M:N:K,... of integers, got {args.points!r}") from None
    if any(len(p) != 3 or min(p) <= 0 for p in points):
        raise SystemExit(f"sustained: --points wants M:N:K,... of positive integers, got {args.points!r}")
    if args.seconds < 1 or args.rounds < 1:
        raise SystemExit("sustained: --seconds must be >= 1 (the first 0.5 s is left out of the sampled window) "
                         "and --rounds >= 1")
    if args.tactic is not None and args.tactic not in TACTICS:
        raise SystemExit(f"sustained: unknown tactic {args.tactic!r}; one of {', '.join(TACTICS)}")
    require_cuda("sustained")
    smi = SmiLog()
    rows = []
    try:
        for M, N, K in points:
            w, b, s = _weights(N, K)
            copies = max(2, math.ceil(L2_SPAN / (b.numel() + 2 * s.numel())))
            w16s = [w.half() for _ in range(copies)]
            packed = [(b.clone(), s.clone()) for _ in range(copies)]
            x = torch.randn(M, K, device="cuda", dtype=torch.float16)
            cfg = TACTICS[args.tactic] if args.tactic else pick_int4_config(M, N, K, BLOCK)
            name = args.tactic or next((n for n, c in TACTICS.items() if c == cfg), cfg.describe())
            fp16 = [lambda w16=w16: torch.nn.functional.linear(x, w16) for w16 in w16s]
            int4 = [lambda bb=bb, ss=ss: int4_gemm(x, bb, ss, block_size=BLOCK, config=cfg) for bb, ss in packed]
            for rnd in range(args.rounds):
                t16, a16, z16 = sustained_us(fp16, args.seconds)
                t4, a4, z4 = sustained_us(int4, args.seconds)
                rows.append((M, N, K, name, rnd, copies, t16, t4, (a16, z16), (a4, z4)))
            del w16s, packed
            torch.cuda.empty_cache()
    finally:
        smi.stop()
    table = Table([f"# INT4 vs fp16 under sustained load on {torch.cuda.get_device_name()} ({args.seconds:g} s per kernel "
             f"and round, weight copies cycled past L2)", "",
             "| M | N | K | int4 tactic | round | copies | fp16 µs | int4 µs | fp16 / int4 | fp16 MHz | int4 MHz "
             "| fp16 W | int4 W |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"], args.out)
    for M, N, K, name, rnd, copies, t16, t4, window16, window4 in rows:
        (c16, p16), (c4, p4) = smi.mean(*window16), smi.mean(*window4)
        table.add(f"| {M} | {N} | {K} | {name} | {rnd} | {copies} | {t16:.1f} | {t4:.1f} | {t16 / t4:.3f}x | "
                     f"{c16:.0f} | {c4:.0f} | {p16:.0f} | {p4:.0f} |")
    table.write()


if __name__ == "__main__":
    main()
