"""INT4 weight-only GEMM (g128, symmetric) vs torch fp16 ``F.linear``, measured side by side.

For M in {1, 4, 16, 64, 256, 1024, 4096} x (N, K) in {(4096, 4096), (11008, 4096), (4096, 11008),
(28672, 8192)} it times, in one run: torch fp16; every tactic of ``INT4_TACTICS`` that suits the M
range (the table reports the fastest, which is what TensorRT's autotuner keeps for the plugin, and
the torch wrapper's default: ``pick_int4_config``'s tactic, or the two-kernel path where
``takes_dequant_path``); for M >= 256 the two-kernel path (dequantize to fp16, then cuBLAS); with
``--sweep`` the candidates of ``sweep_configs`` (fastest in its own columns); optionally
the previous kernel (``--before FILE``, a copy of
an older int4_gemm.py). µs, TFLOPS and effective weight bandwidth (packed bytes + scales / time).

Timing: each callable is captured in a CUDA graph and ``triton.testing.do_bench`` (median) replays
it, clearing L2 (a 256 MB write) before every repetition, so weights stream from HBM in every column
and host launch overhead (Python, Triton's launcher) is out of every column alike. A single replay
still pays the graph's own launch on the GPU (~4-5 µs, which ncu does not count), a large share of
a 10-20 µs GEMV; so with ``--stream R`` the fp16 and the chosen INT4 kernel are also timed as R
back-to-back calls in one graph, each call on its own copy of the weights (so no call finds its
weights in L2), divided by R: the per-GEMM time inside a decode
step, where an engine runs one layer's GEMMs after another. When the chosen tactic is the mma kernel
(the only one that waits for the grid before it), the chain is also timed with every call launched
programmatically (PDL: each call may start while the one before finishes); torch launches cuBLAS
plainly, so the fp16 chain has no such column. Every point is
timed in two passes and the faster median kept; the GPU is kept busy for 0.5 s before each shape so
its clocks are up. Each tactic's output is checked against the fp16 product of the dequantized
weight; a wrong one is marked BAD and never chosen. Kernels are compiled first by ``--jobs`` worker
processes (Triton's on-disk cache).

    python benchmarks/bench_int4_gemm.py [--ms 1,4,16] [--shapes 11008:4096] [--jobs 12] [--before old.py]
        [--sweep] [--profile-once] [--stream 8] [--out results.md]
"""

# ruff: noqa: B023  (each lambda is timed inside the iteration that defines it)
from __future__ import annotations

import argparse
import importlib.util
import itertools
import math
import multiprocessing as mp
import os
import sys
import time

import torch
import triton

from qcompiler.plugins.int4_gemm import (
    CUDA_CONFIGS,
    INT4_TACTICS,
    Int4GemmConfig,
    dequantize_int4,
    fit_int4_config,
    int4_gemm,
    int4_gemm_dequant_matmul,
    pick_int4_config,
    takes_dequant_path,
)
from qcompiler.plugins.int4_gemm_mma import INT4_MMA_TACTICS, Int4MmaConfig
from qcompiler.plugins.int4_gemm_wgmma import INT4_WGMMA_TACTICS, Int4WgmmaConfig
from qcompiler.plugins.ops import pack_int4_matmulnbits

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (28672, 8192)]
MS = [1, 4, 16, 64, 256, 1024, 4096]
BLOCK = 128
C = Int4GemmConfig
# what the plugin offers TensorRT: Triton and CUDA C++ tactics
TACTICS = {**INT4_TACTICS, **INT4_MMA_TACTICS, **INT4_WGMMA_TACTICS}


def tactics_for(M):
    """Tactics of the table worth timing at this M (the others lose by construction)."""
    names = {"m16", "m16_n32", "m16_n64", "m16_k8", "m64"} if M <= 16 else set()
    if M <= 4:
        names |= {"gemv", "gemv_n4"}
    if 16 < M <= 64:
        names |= {"m16_n32", "m16_n64", "m64", "m256"}
    if M > 64:
        names |= {"m256", "large", "swap_128x64_w4", "swap_256x128"} | ({"m64", "swap_64x64"} if M <= 256 else set())
    if M <= 64:
        names |= set(INT4_MMA_TACTICS)
    if M >= 64:
        names |= set(INT4_WGMMA_TACTICS)
    return [n for n in TACTICS if n in names]


def _describe(cfg, K):
    return cfg.describe() if isinstance(cfg, CUDA_CONFIGS) else fit_int4_config(cfg, K, BLOCK).describe()


def sweep_configs(M, mma_only=False):
    """Extra candidates for ``--sweep`` (see benchmarks/gpu_notes.md for why each is there)."""
    if M >= 64:
        # The CUDA C++ wgmma kernel: warpgroups (64 weight rows each) x tokens per CTA x shared-memory stages x
        # producer warpgroup or not x multiplying warpgroups along K (session 10).
        for wg, mt, st, ws, ks in itertools.product((1, 2), (64, 128, 256), (3, 4, 5, 6), (False, True), (1, 2, 3, 4)):
            try:
                yield Int4WgmmaConfig(wg, mt, st, ws, ks)
            except ValueError:  # over the shared-memory limit, or no K split for that form
                pass
    if M <= 16:
        # The CUDA C++ kernel: n8 tiles per warp x warps (along N x along K) x span buffers in flight x plain or
        # swap-AB (session 14). (Session 6 also swept the weights through 3-8 cp.async shared-memory stages:
        # slower everywhere.)
        for nt, (wn, wk), depth, swap in itertools.product((1, 2, 4), ((1, 4), (1, 8), (1, 16), (2, 4), (4, 4)), (2, 3),
                                                           (False, True)):
            if wn * wk * nt * 512 <= 48 * 1024 and not (swap and nt % 2):
                yield Int4MmaConfig(nt, wn * wk, wn, depth, SWAP=swap)
    if mma_only:
        return
    if 4 < M <= 16:
        # N tile (x re-read from L2 per weight byte), K step and pipeline depth (bytes in flight), one
        # warp per K-slice; the S3-1 sweep in gpu_notes.md.
        for bn, (bk, ks), st in itertools.product((16, 32, 64), ((256, 4), (512, 4), (1024, 8)), (3, 4, 6)):
            if (st - 1) * (16 * bk * 2 + bn * bk // 2) <= 200 * 1024:  # x + weight buffers fit shared memory
                yield C(16, bn, bk, ks, st, SPLIT_X=True, KSPLIT=ks)
    elif M <= 4:
        # CUDA-core GEMV (session 4): rows per program, K per step, warps; BLOCK_M covers M or is 1.
        for bm in sorted({1, 1 << (M - 1).bit_length()}):
            for bn, bk, w in ((4, 1024, 4), (8, 512, 2), (16, 512, 2), (16, 1024, 4), (8, 2048, 8),
                              (16, 2048, 8), (32, 1024, 4), (8, 2048, 4), (16, 1024, 2)):
                yield C(bm, bn, bk, w, 1, DOT=False)
    elif M <= 128:
        yield C(64, 64, 128, 4, 4, SCALE_AFTER=True)
        yield C(32, 64, 128, 4, 4, SCALE_AFTER=True)
        yield C(64, 128, 64, 4, 4, SPLIT_X=True)
    else:
        for bm, bn, bk, w, st, split in [(128, 128, 64, 8, 3, False), (128, 128, 64, 8, 4, True),
                                         (256, 128, 64, 8, 4, True), (128, 256, 64, 8, 3, True),
                                         (128, 128, 128, 8, 3, False), (64, 128, 64, 4, 4, False)]:
            yield C(bm, bn, bk, w, st, SPLIT_X=split, GROUP_M=8)
        # Session 5: the swap-AB tactics' tiles without the swap (is the gain the swap or the tile?), and
        # the swap-AB variants that lost in the first table (same tile as m256; register-direct scale_after).
        yield C(128, 64, 64, 4, 4, GROUP_M=8)
        yield C(256, 128, 64, 8, 3, GROUP_M=8)
        yield C(128, 128, 64, 8, 4, GROUP_M=8, SWAP_AB=True)
        yield C(128, 128, 64, 8, 4, GROUP_M=8, SWAP_AB=True, SCALE_AFTER=True)
        yield C(256, 64, 64, 4, 3, GROUP_M=8, SWAP_AB=True)


def candidates(M, sweep, cuda_only=False):
    out = [(name, TACTICS[name]) for name in tactics_for(M)]
    if sweep:
        out += [(cfg.describe(), cfg) for cfg in sweep_configs(M, sweep == "mma") if cfg not in TACTICS.values()]
    return [(n, c) for n, c in out if isinstance(c, CUDA_CONFIGS)] if cuda_only else out


def _weights(N, K):
    torch.manual_seed(N + K)
    w = torch.randn(N, K, device="cuda") * 0.02
    b, s, _ = pack_int4_matmulnbits(w, BLOCK, scale_dtype=torch.float16)
    return w, b, s


def _load_module(path):
    spec = importlib.util.spec_from_file_location("int4_gemm_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module's annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def _compile_worker(task):
    """Runs each (M, config) once on the real shape so Triton's disk cache holds the kernel."""
    N, K, items, before = task
    _, b, s = _weights(N, K)
    old = _load_module(before) if before else None
    failed = []
    for M, cfg in items:
        x = torch.randn(M, K, device="cuda", dtype=torch.float16)
        try:
            if cfg == "before":
                old.int4_gemm(x, b, s, block_size=BLOCK)
            elif cfg == "dq":
                int4_gemm_dequant_matmul(x, b, s, block_size=BLOCK)
            else:
                int4_gemm(x, b, s, block_size=BLOCK, config=cfg)
        except Exception as err:  # reported again (and skipped) by the timing loop
            failed.append((M, str(cfg), f"{type(err).__name__}: {str(err)[-200:]}"))
    torch.cuda.synchronize()
    return failed


def precompile(points: dict, jobs: int, before: str | None) -> None:
    """points: (N, K) -> list of (M, config | "dq" | "before"), compiled in ``jobs`` processes."""
    tasks = []
    for (N, K), items in points.items():
        chunk = max(1, math.ceil(len(items) / max(1, jobs // len(points))))
        tasks += [(N, K, items[i:i + chunk], before) for i in range(0, len(items), chunk)]
    t0 = time.time()
    with mp.get_context("spawn").Pool(jobs) as pool:
        for failed in pool.imap_unordered(_compile_worker, tasks):
            for f in failed:
                print("  compile failed:", *f, file=sys.stderr)
    print(f"# precompiled {sum(len(v) for v in points.values())} (M, tactic) pairs in {time.time() - t0:.0f} s",
          file=sys.stderr, flush=True)


def graph_of(calls) -> torch.cuda.CUDAGraph:
    """The calls captured in order as one CUDA graph, each run once first (compiles and allocations stay outside)."""
    for call in calls:
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    return graph


def bench(fn, warmup=25, rep=100):
    """Median µs of a CUDA-graph replay of fn (L2 cleared before each replay by do_bench)."""
    graph = graph_of([fn])
    return triton.testing.do_bench(graph.replay, warmup=warmup, rep=rep, return_mode="median") * 1e3


def bench_stream(make_fns, copies, warmup=10, rep=50):
    """µs per call of ``copies`` calls replayed back to back in one CUDA graph (L2 cleared before each replay)."""
    graph = graph_of(make_fns(copies))
    return triton.testing.do_bench(graph.replay, warmup=warmup, rep=rep, return_mode="median") * 1e3 / copies


def parse_shapes(spec: str | None, default: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """``N:K,N:K`` as (N, K) pairs; ``default`` when no spec is given. Anything else exits with a one-line error."""
    if not spec:
        return list(default)
    try:
        shapes = [tuple(map(int, s.split(":"))) for s in spec.split(",")]
    except ValueError:
        shapes = []
    if not shapes or any(len(shape) != 2 or min(shape) <= 0 for shape in shapes):
        raise SystemExit(f"--shapes wants N:K,... of positive integers, got {spec!r}")
    return shapes


def require_cuda(script: str) -> None:
    """Exits with a one-line error when there is no CUDA GPU (the GPU benchmarks' first check)."""
    if not torch.cuda.is_available():
        raise SystemExit(f"{script}: needs a CUDA GPU (torch.cuda.is_available() is False)")


def shapes_and_out(argv=None) -> tuple[list[tuple[int, int]], str | None]:
    """The command line of the scripts that take only ``--shapes N:K,...`` (default SHAPES) and ``--out``."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default=None, help="N:K,N:K")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    return parse_shapes(args.shapes, SHAPES), args.out


class Table:
    """A markdown report: the head (title, notes, column header) is printed at once and each row as it is added;
    :meth:`write` saves head, rows and any ``after`` lines (e.g. a detail section) to ``out``, if one was given,
    through a temporary file, so an interrupted write leaves the previous file whole."""

    def __init__(self, head: list[str], out: str | None = None):
        self.lines = list(head)
        self.out = out
        print("\n".join(self.lines), flush=True)

    def add(self, row: str) -> None:
        self.lines.append(row)
        print(row, flush=True)

    def write(self, after: list[str] = ()) -> None:
        if not self.out:
            return
        tmp = f"{self.out}.tmp"
        with open(tmp, "w") as f:
            f.write("\n".join(self.lines + list(after)) + "\n")
        os.replace(tmp, self.out)


def fastest_tactic(names, x, b, s, timer=bench) -> tuple[str, float]:
    """(name, µs) of the fastest of the named INT4 tactics on ``x`` and the packed weight ``(b, s)``, each timed
    with ``timer(fn)`` (default: :func:`bench`)."""
    times = {n: timer(lambda c=TACTICS[n]: int4_gemm(x, b, s, block_size=BLOCK, config=c)) for n in names}
    best = min(times, key=times.get)
    return best, times[best]


def rel_err(y, ref):
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--shapes", default=None, help="N:K,N:K")
    ap.add_argument("--sweep", nargs="?", const="all", default=None, choices=["all", "mma"],
                    help="also time the extra candidates of sweep_configs (mma: the CUDA C++ kernels' only)")
    ap.add_argument("--before", default=None, help="path of an older int4_gemm.py to time as 'before'")
    ap.add_argument("--jobs", type=int, default=0, help="compile in this many processes first (0: no)")
    ap.add_argument("--compile-only", action="store_true", help="with --jobs: fill the kernel cache and stop")
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--cuda-only", action="store_true", help="time only the CUDA C++ tactics (and fp16, dq+cuBLAS)")
    ap.add_argument("--stream", type=int, default=0, metavar="R",
                    help="also time fp16 and the chosen INT4 tactic as R back-to-back calls on R weight copies "
                         "(M <= 64 only; 0: off)")
    ap.add_argument("--profile-once", action="store_true",
                    help="run each table tactic once per point, untimed (for a profiler such as ncu), and stop")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    ms = [int(m) for m in args.ms.split(",")]
    shapes = parse_shapes(args.shapes, SHAPES)
    old = _load_module(args.before) if args.before else None

    def extras(M):
        return (["dq"] if M >= 256 else []) + (["before"] if old else [])

    if args.jobs:
        # Triton only: the CUDA C++ tactics compile in-process in ~0.1 s (NVRTC).
        precompile({(N, K): [(M, c) for M in ms for c in [c for _, c in candidates(M, args.sweep, args.cuda_only)
                                                          if not isinstance(c, CUDA_CONFIGS)] + extras(M)]
                    for N, K in shapes}, args.jobs, args.before)
    if args.compile_only:
        return
    if args.profile_once:
        for (N, K), M in itertools.product(shapes, ms):
            _, b, s = _weights(N, K)
            x = torch.randn(M, K, device="cuda", dtype=torch.float16)
            for name, cfg in candidates(M, False):
                if name != "m64":
                    print(f"# launch: M={M} N={N} K={K} {name} {_describe(cfg, K)}", flush=True)
                    int4_gemm(x, b, s, block_size=BLOCK, config=cfg)
                    torch.cuda.synchronize()
        return
    dev = torch.cuda.get_device_name()
    lines = [f"# INT4 GEMM (g{BLOCK}, sym) vs torch fp16 on {dev}", "",
             "int4 = fastest tactic of INT4_TACTICS + INT4_MMA_TACTICS + INT4_WGMMA_TACTICS (what TensorRT's "
             "autotuner keeps); pick = the torch wrapper's default (int4_gemm with config=None: pick_int4_config's "
             "tactic, or dq+cuBLAS where takes_dequant_path); dq+cuBLAS = dequantize to fp16 then cuBLAS (torch "
             "path only); before = previous kernel; "
             "sweep = fastest --sweep candidate outside INT4_TACTICS.", "",
             "| M | N | K | fp16 µs | int4 µs | speedup | int4 TFLOPS | int4 weight TB/s | tactic | pick µs | pick x "
             "| dq+cuBLAS µs | dq x | before µs | before x | rel err | stream fp16 µs | stream int4 µs | stream x "
             "| stream int4 PDL µs | stream PDL x | sweep µs | sweep x | sweep config |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    table = Table(lines, args.out)
    detail = ["", "## Every timed tactic", "", "| M | N | K | tactic | config | µs | speedup | rel err |",
              "|---|---|---|---|---|---|---|---|"]
    for N, K in shapes:
        w, b, s = _weights(N, K)
        w16 = w.half()
        wq16 = dequantize_int4(b, s, None, K, torch.float16)
        wbytes = b.numel() + s.numel() * 2
        a = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
        t_end = time.time() + 0.5
        while time.time() < t_end:  # clocks up before the first timing of this shape
            a @ a
        torch.cuda.synchronize()
        for M in ms:
            x = torch.randn(M, K, device="cuda", dtype=torch.float16)
            ref = torch.nn.functional.linear(x, wq16)
            runs = [("fp16", None, lambda: torch.nn.functional.linear(x, w16))]
            for name, cfg in candidates(M, args.sweep, args.cuda_only):
                runs.append((name, cfg, lambda cfg=cfg: int4_gemm(x, b, s, block_size=BLOCK, config=cfg)))
            if M >= 256:
                runs.append(("dq", None, lambda: int4_gemm_dequant_matmul(x, b, s, block_size=BLOCK)))
            if old:
                runs.append(("before", None, lambda: old.int4_gemm(x, b, s, block_size=BLOCK)))
            times, errs = {}, {}
            for _ in range(args.passes):
                for name, _cfg, fn in runs:
                    try:
                        if name not in errs:
                            errs[name] = 0.0 if name == "fp16" else rel_err(fn(), ref)
                        t = bench(fn)
                    except Exception as e:  # a tactic that does not fit shared memory / registers
                        print(f"  skip {name}: {type(e).__name__}: {str(e)[-160:]}", file=sys.stderr)
                        errs[name] = math.inf
                        continue
                    times[name] = min(times.get(name, math.inf), t)
            t16 = times["fp16"]
            good = {n: t for n, t in times.items() if n not in ("fp16", "dq", "before") and errs[n] < 5e-3}
            ok = {n: t for n, t in good.items() if n in TACTICS}
            extra = {n: t for n, t in good.items() if n not in TACTICS}
            for name, cfg, _ in runs[1:]:
                if name in times:
                    desc = _describe(cfg, K) if cfg else name
                    detail.append(f"| {M} | {N} | {K} | {name} | {desc} | {times[name]:.1f} | {t16 / times[name]:.2f}x | "
                                  f"{errs[name]:.1e}{'' if errs[name] < 5e-3 else ' BAD'} |")
            if not ok:
                continue
            best = min(ok, key=ok.get)
            t4 = ok[best]
            # The wrapper's default (config=None): the two-kernel path where it takes it, else its tactic.
            pick = pick_int4_config(M, N, K, BLOCK)
            pick_name = next((n for n, c in TACTICS.items()
                              if (c if isinstance(c, CUDA_CONFIGS) else fit_int4_config(c, K, BLOCK)) == pick), None)
            tp = times.get("dq", math.nan) if takes_dequant_path(M, N, K, BLOCK) else ok.get(pick_name, math.nan)

            def col(t):
                return ("-", "-") if not math.isfinite(t) else (f"{t:.1f}", f"{t16 / t:.2f}x")

            dq, bf = col(times.get("dq", math.nan)), col(times.get("before", math.nan))
            sw_name = min(extra, key=extra.get) if extra else "-"
            sw = col(extra.get(sw_name, math.nan))
            stream = ("-",) * 5
            if args.stream and M <= 64:
                best_cfg = next(c for n, c, _ in runs if n == best)
                copies = [(w16.clone(), b.clone(), s.clone()) for _ in range(args.stream)]
                s16 = bench_stream(lambda r: [lambda w=c[0]: torch.nn.functional.linear(x, w) for c in copies[:r]],
                                   args.stream)

                def chain_us(pdl):
                    return bench_stream(lambda r: [lambda c=c: int4_gemm(x, c[1], c[2], block_size=BLOCK, config=best_cfg,
                                                                         programmatic_launch=pdl) for c in copies[:r]],
                                        args.stream)

                s4 = chain_us(False)
                s4p = chain_us(True) if isinstance(best_cfg, Int4MmaConfig) else math.nan
                del copies
                pdl = ("-", "-") if math.isnan(s4p) else (f"{s4p:.1f}", f"{s16 / s4p:.2f}x")
                stream = (f"{s16:.1f}", f"{s4:.1f}", f"{s16 / s4:.2f}x", *pdl)
            row = (f"| {M} | {N} | {K} | {t16:.1f} | {t4:.1f} | {t16 / t4:.2f}x | {2 * M * N * K / t4 / 1e6:.1f} | "
                   f"{wbytes / t4 / 1e6:.2f} | {best} | {col(tp)[0]} | {col(tp)[1]} | {dq[0]} | {dq[1]} | "
                   f"{bf[0]} | {bf[1]} | {errs[best]:.1e} | {' | '.join(stream)} | {sw[0]} | {sw[1]} | {sw_name} |")
            table.add(row)
            table.write(detail)  # after every point, so a run cut short keeps what it measured
    table.write(detail)


if __name__ == "__main__":
    main()
