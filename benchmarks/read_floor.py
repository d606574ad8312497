"""How fast can the packed INT4 weight be read at all, timed exactly like bench_int4_gemm.py?

For each benchmark shape it times, side by side in one run (CUDA-graph replay, L2 cleared before every
replay): torch fp16 ``F.linear`` at M = 1; a plain streaming read of the packed weight (16 bytes per
lane, consecutive lanes on consecutive bytes, a grid-stride loop, one value written per CTA); the same
bytes read in the CUDA C++ INT4 kernel's pattern (lane (g, t) of a quad takes 16 bytes of row g, a
warp 8 rows x 64 bytes per load, warps interleaved along K, one span ahead) with no arithmetic; and the
fastest INT4 tactic. The read kernels set the floor the INT4 kernel is measured against: if the pattern
read is as slow as the kernel, the arithmetic is not what is left.

    python -m benchmarks.read_floor [--shapes 11008:4096,...] [--out read_floor.md]
"""

# ruff: noqa: B023  (each closure is timed inside the iteration that defines it)
from __future__ import annotations

import argparse

import numpy as np
import torch

from benchmarks.bench_int4_gemm import BLOCK, SHAPES, TACTICS, _weights, bench
from qcompiler.plugins.int4_gemm import int4_gemm
from qcompiler.plugins.nvrtc import compile_to_ptx

_SOURCE = r"""
typedef unsigned int u32;
extern "C" __global__ void stream_read(const uint4* __restrict__ p, long long n16, u32* out) {
  u32 acc = 0;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n16; i += (long long)gridDim.x * blockDim.x) {
    uint4 v = __ldg(p + i);
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (acc == 0x9e3779b9u) out[blockIdx.x] = acc;  // keeps the loads; practically never taken
}

// Four independent 16-byte loads per lane per trip (4x the bytes in flight of stream_read).
extern "C" __global__ void stream4_read(const uint4* __restrict__ p, long long n16, u32* out) {
  u32 acc = 0;
  const long long step = (long long)gridDim.x * blockDim.x;
  long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
  for (; i + 3 * step < n16; i += 4 * step) {
    uint4 a = __ldg(p + i), b = __ldg(p + i + step), c = __ldg(p + i + 2 * step), d = __ldg(p + i + 3 * step);
    acc ^= a.x ^ b.y ^ c.z ^ d.w ^ a.w ^ b.x ^ c.y ^ d.z;
  }
  for (; i < n16; i += step) acc ^= __ldg(p + i).x;
  if (acc == 0x9e3779b9u) out[blockIdx.x] = acc;
}

// The INT4 kernel's load pattern (4 warps along K, 32 rows per CTA, 128-weight spans, one span ahead).
extern "C" __global__ void pattern_read(const unsigned char* __restrict__ B, int row_bytes, int spans, u32* out) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const unsigned char* base = B + (long long)(blockIdx.x * 32 + g) * row_bytes + 16 * t;
  u32 acc = 0;
  uint4 cur[4], nxt[4];
  for (int j = 0; j < 4; ++j) cur[j] = __ldg((const uint4*)(base + 8 * j * row_bytes + 64 * warp));
  for (int s = warp; s < spans; s += 4) {
    const int sn = min(s + 4, spans - 1);
    for (int j = 0; j < 4; ++j) nxt[j] = __ldg((const uint4*)(base + 8 * j * row_bytes + 64 * sn));
    for (int j = 0; j < 4; ++j) acc ^= cur[j].x ^ cur[j].y ^ cur[j].z ^ cur[j].w;
    for (int j = 0; j < 4; ++j) cur[j] = nxt[j];
  }
  if (acc == 0x9e3779b9u) out[blockIdx.x] = acc;
}

// The same CTA geometry and bytes, but warp loads of 4 rows x 128 contiguous bytes (pairs of spans,
// 8 lanes per row) instead of 8 rows x 64 bytes: does the shape of a warp's request matter?
extern "C" __global__ void pattern128_read(const unsigned char* __restrict__ B, int row_bytes, int spans, u32* out) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const unsigned char* base = B + (long long)(blockIdx.x * 32 + lane / 8) * row_bytes + 16 * (lane % 8);
  u32 acc = 0;
  uint4 cur[8], nxt[8];
  const int pairs = spans / 2;
  for (int j = 0; j < 8; ++j) cur[j] = __ldg((const uint4*)(base + 4 * j * row_bytes + 128 * warp));
  for (int s = warp; s < pairs; s += 4) {
    const int sn = min(s + 4, pairs - 1);
    for (int j = 0; j < 8; ++j) nxt[j] = __ldg((const uint4*)(base + 4 * j * row_bytes + 128 * sn));
    for (int j = 0; j < 8; ++j) acc ^= cur[j].x ^ cur[j].y ^ cur[j].z ^ cur[j].w;
    for (int j = 0; j < 8; ++j) cur[j] = nxt[j];
  }
  if (acc == 0x9e3779b9u) out[blockIdx.x] = acc;
}
"""


def read_kernels():
    """Loads the read kernels; returns ``launch(name, grid, block, *params)``, which runs one on torch's current
    stream (so a CUDA graph being captured there records it) with the per-CTA output buffer appended."""
    import cupy

    module = cupy.cuda.function.Module()
    module.load(compile_to_ptx(_SOURCE, "read_floor.cu").encode())
    out = torch.zeros(1 << 16, dtype=torch.int32, device="cuda")

    def launch(name, grid, block, *params):
        with cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream):  # as plugins/launch.py
            module.get_function(name)(grid, block, params + (np.uint64(out.data_ptr()),))
    return launch


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default=None, help="N:K,N:K")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    shapes = [tuple(map(int, s.split(":"))) for s in args.shapes.split(",")] if args.shapes else SHAPES
    launch = read_kernels()
    sms = torch.cuda.get_device_properties(0).multi_processor_count

    def time_read(name, grid, block, *params):
        """Median µs of one read kernel (captured in the timing graph)."""
        return bench(lambda: launch(name, grid, block, *params))

    lines = [f"# Read floor of the packed INT4 weight (g{BLOCK}) on {torch.cuda.get_device_name()}", "",
             "| N | K | packed MB | fp16 M=1 µs | stream read µs | stream TB/s | pattern read µs | pattern TB/s | "
             "pattern 4x128B µs | int4 M=1 µs | tactic | fp16 / stream read | fp16 / int4 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for N, K in shapes:
        w, b, s = _weights(N, K)
        w16 = w.half()
        x = torch.randn(1, K, device="cuda", dtype=torch.float16)
        nbytes = b.numel()
        t16 = bench(lambda: torch.nn.functional.linear(x, w16))
        flat = (np.uint64(b.data_ptr()), np.int64(nbytes // 16))
        rows = (np.uint64(b.data_ptr()), np.int32(nbytes // N), np.int32(nbytes // N // 64))
        t_stream = min(time_read(name, (sms * 8,), (256,), *flat) for name in ("stream_read", "stream4_read"))
        t_pattern = time_read("pattern_read", (N // 32,), (128,), *rows)
        t_p128 = time_read("pattern128_read", (N // 32,), (128,), *rows)
        t4 = {name: bench(lambda cfg=cfg: int4_gemm(x, b, s, block_size=BLOCK, config=cfg))
              for name, cfg in TACTICS.items() if name.startswith(("mma", "gemv"))}
        best = min(t4, key=t4.get)
        row = (f"| {N} | {K} | {nbytes / 1e6:.1f} | {t16:.1f} | {t_stream:.1f} | {nbytes / t_stream / 1e6:.2f} | "
               f"{t_pattern:.1f} | {nbytes / t_pattern / 1e6:.2f} | {t_p128:.1f} | {t4[best]:.1f} | {best} | "
               f"{t16 / t_stream:.2f}x | {t16 / t4[best]:.2f}x |")
        lines.append(row)
        print(row, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
