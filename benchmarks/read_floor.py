"""How fast can the packed INT4 weight be read at all, timed exactly like bench_int4_gemm.py?

For each benchmark shape it times, side by side in one run (CUDA-graph replay, L2 cleared before every
replay): torch fp16 ``F.linear`` at M = 1; a plain streaming read of the packed weight (16 bytes per
lane, consecutive lanes on consecutive bytes, a grid-stride loop, one value written per CTA); the same
bytes read in the CUDA C++ INT4 kernel's pattern (lane (g, t) of a quad takes 16 bytes of row g, a
warp 8 rows x 64 bytes per load, warps interleaved along K, one span ahead) with no arithmetic; the
same pattern with the kernel's x loads at M = 1 added; the
same 32 rows per CTA fed through shared memory by a producer warp's ``cp.async.bulk`` copies (a ring of
stages and mbarriers, read back in the kernel's fragment order); and the fastest INT4 tactic. The read
kernels set the floor the INT4 kernel is measured against: if the pattern read is as slow as the kernel,
the arithmetic is not what is left.

    python -m benchmarks.read_floor [--shapes 11008:4096,...] [--out read_floor.md]
"""

# ruff: noqa: B023  (each closure is timed inside the iteration that defines it)
from __future__ import annotations

import numpy as np
import torch

from benchmarks.bench_int4_gemm import BLOCK, TACTICS, Table, _weights, bench, fastest_tactic, require_cuda, shapes_and_out
from qcompiler.plugins.cuda_source import fill
from qcompiler.plugins.launch import allow_dynamic_shared
from qcompiler.plugins.nvrtc import compile_to_ptx

_SOURCE = fill(r"""
#define BF16 0
#define STAGES BULK_STAGES
#define BULK_STAGES 4
@HALF2_HELPERS@
@WGMMA_HELPERS@
@PIPELINE_HELPERS@
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

// The INT4 kernel's weight load (int4_gemm_mma.py's load_weights): read-only path, not kept in L1, and L2 fetches
// 256-byte sector groups on a miss. A plain __ldg here made the pattern read ~15% slower than the kernel's own loads.
__device__ __forceinline__ uint4 weight_load(const unsigned char* p) {
  uint4 r;
  asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
  return r;
}

// The INT4 kernel's load pattern (4 warps along K, 32 rows per CTA, 128-weight spans, one span ahead); WITH_X adds
// its x loads at M = 1 (each lane 64 bytes of row 0 at its 32 k per span, L1-cached): every load the kernel issues
// at M = 1 except the scales.
template <bool WITH_X>
__device__ __forceinline__ void pattern(const unsigned char* __restrict__ B, const uint4* __restrict__ X, int row_bytes,
                                        int spans, u32* out) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const unsigned char* base = B + (long long)(blockIdx.x * 32 + g) * row_bytes + 16 * t;
  u32 acc = 0;
  uint4 cur[4], nxt[4], xc[4], xn[4];
  for (int j = 0; j < 4; ++j) cur[j] = weight_load(base + 8 * j * row_bytes + 64 * warp);
  if (WITH_X)
    for (int v = 0; v < 4; ++v) xc[v] = __ldg(X + 16 * warp + 4 * t + v);
  for (int s = warp; s < spans; s += 4) {
    const int sn = min(s + 4, spans - 1);
    for (int j = 0; j < 4; ++j) nxt[j] = weight_load(base + 8 * j * row_bytes + 64 * sn);
    if (WITH_X)
      for (int v = 0; v < 4; ++v) xn[v] = __ldg(X + 16 * sn + 4 * t + v);
    for (int j = 0; j < 4; ++j) acc ^= cur[j].x ^ cur[j].y ^ cur[j].z ^ cur[j].w;
    if (WITH_X)
      for (int v = 0; v < 4; ++v) acc += xc[v].x ^ xc[v].w;
    for (int j = 0; j < 4; ++j) cur[j] = nxt[j];
    if (WITH_X)
      for (int v = 0; v < 4; ++v) xc[v] = xn[v];
  }
  if (acc == 0x9e3779b9u) out[blockIdx.x] = acc;
}

extern "C" __global__ void pattern_read(const unsigned char* __restrict__ B, int row_bytes, int spans, u32* out) {
  pattern<false>(B, nullptr, row_bytes, spans, out);
}

extern "C" __global__ void pattern_x_read(const unsigned char* __restrict__ B, const uint4* __restrict__ X,
                                          int row_bytes, int spans, u32* out) {
  pattern<true>(B, X, row_bytes, spans, out);
}

// The same CTA geometry and bytes, but warp loads of 4 rows x 128 contiguous bytes (pairs of spans,
// 8 lanes per row) instead of 8 rows x 64 bytes: does the shape of a warp's request matter?
extern "C" __global__ void pattern128_read(const unsigned char* __restrict__ B, int row_bytes, int spans, u32* out) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const unsigned char* base = B + (long long)(blockIdx.x * 32 + lane / 8) * row_bytes + 16 * (lane % 8);
  u32 acc = 0;
  uint4 cur[8], nxt[8];
  const int pairs = spans / 2;
  for (int j = 0; j < 8; ++j) cur[j] = weight_load(base + 4 * j * row_bytes + 128 * warp);
  for (int s = warp; s < pairs; s += 4) {
    const int sn = min(s + 4, pairs - 1);
    for (int j = 0; j < 8; ++j) nxt[j] = weight_load(base + 4 * j * row_bytes + 128 * sn);
    for (int j = 0; j < 8; ++j) acc ^= cur[j].x ^ cur[j].y ^ cur[j].z ^ cur[j].w;
    for (int j = 0; j < 8; ++j) cur[j] = nxt[j];
  }
  if (acc == 0x9e3779b9u) out[blockIdx.x] = acc;
}

// The same 32 rows per CTA fed by a producer warp: BULK_STAGES shared-memory stages of BULK_CHUNK bytes per row,
// one cp.async.bulk per row and stage (evict-first in L2), mbarriers; 4 reading warps take the stage's 64-byte
// spans in turn and read them in the INT4 kernel's fragment order (lane (g, t): 16 bytes of row g) with LDS.128.
// Few instructions keep many bytes in flight: what a producer-fed kernel could reach.
#define BULK_ROWS 32
#define BULK_CHUNK 512
#define BULK_READERS 4
#define BULK_PITCH (BULK_CHUNK + 64)  // rows g and g + 1 on other banks
extern "C" __global__ void __launch_bounds__(32 * (BULK_READERS + 1)) bulk_read(const unsigned char* __restrict__ B,
                                                                               int row_bytes, u32* out) {
  extern __shared__ __align__(128) unsigned char stages[];
  __shared__ __align__(8) unsigned long long full[BULK_STAGES], empty[BULK_STAGES];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (threadIdx.x == 0) {
    for (int i = 0; i < BULK_STAGES; ++i) {
      mbar_init(smem_addr(&full[i]), 1);
      mbar_init(smem_addr(&empty[i]), BULK_READERS);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  const int chunks = (row_bytes + BULK_CHUNK - 1) / BULK_CHUNK;
  if (warp == BULK_READERS) {
    unsigned long long policy;
    asm("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
    const unsigned char* rows = B + (long long)blockIdx.x * BULK_ROWS * row_bytes;
    Slot slot;
    for (int c = 0; c < chunks; ++c, slot.next()) {
      const int size = min(BULK_CHUNK, row_bytes - c * BULK_CHUNK);
      mbar_wait(smem_addr(&empty[slot.stage]), slot.phase ^ 1);  // the first round passes: the "previous" phase
      if (lane == 0)
        asm volatile("{ .reg .b64 s; mbarrier.arrive.expect_tx.shared::cta.b64 s, [%0], %1; }"
                     :: "r"(smem_addr(&full[slot.stage])), "r"(BULK_ROWS * size) : "memory");
      __syncwarp();
      asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], %4;"
                   :: "r"(smem_addr(stages + (slot.stage * BULK_ROWS + lane) * BULK_PITCH)),
                      "l"(rows + (long long)lane * row_bytes + c * BULK_CHUNK), "r"(size), "r"(smem_addr(&full[slot.stage])),
                      "l"(policy) : "memory");
    }
    return;
  }
  const int g = lane >> 2, t = lane & 3;
  u32 acc = 0;
  Slot slot;
  for (int c = 0; c < chunks; ++c, slot.next()) {
    mbar_wait(smem_addr(&full[slot.stage]), slot.phase);
    const int spans = min(BULK_CHUNK, row_bytes - c * BULK_CHUNK) / 64;
    for (int sp = warp; sp < spans; sp += BULK_READERS)
      for (int j = 0; j < BULK_ROWS / 8; ++j) {
        const v4 w = lds128(smem_addr(stages + (slot.stage * BULK_ROWS + 8 * j + g) * BULK_PITCH + 64 * sp + 16 * t));
        acc ^= w.a ^ w.b ^ w.c ^ w.d;
      }
    // Hand the stage back only after the loads returned (an arrive does not wait for them): it takes acc.
    __syncwarp();
    if (lane == 0) asm volatile("{ .reg .b64 s; mbarrier.arrive.shared::cta.b64 s, [%0]; }"
                                :: "r"(smem_addr(&empty[slot.stage])), "r"(acc) : "memory");
  }
  if (acc == 0x9e3779b9u) out[blockIdx.x] = acc;
}
""", {})
BULK_SHARED_BYTES = 4 * 32 * (512 + 64)  # BULK_STAGES * BULK_ROWS * BULK_PITCH
PTX_ISA = "8.0"  # cp.async.bulk and mbarrier expect_tx: loads on CUDA 12.0 drivers and later, assembles with ptxas 12.x
READ_MARK = 0x9E3779B9  # the value a read kernel writes out when a thread's XOR of its words equals it
STREAM_READS = ("stream_read", "stream4_read")  # the grid-stride plain reads (``launch.stream``)


def read_kernels():
    """Loads the read kernels; returns ``launch(name, grid, block, *params)``, which runs one on torch's current
    stream (so a CUDA graph being captured there records it) with the per-CTA output buffer appended, and
    ``launch.stream(tensor, name)``, a grid-stride plain read (one of STREAM_READS) of a tensor's bytes."""
    import cupy

    module = cupy.cuda.function.Module()
    module.load(compile_to_ptx(_SOURCE, "read_floor.cu", ptx_version=PTX_ISA).encode())
    out = torch.zeros(1 << 16, dtype=torch.int32, device="cuda")
    allow_dynamic_shared(module.get_function("bulk_read"), BULK_SHARED_BYTES)

    def launch(name, grid, block, *params):
        shared = BULK_SHARED_BYTES if name == "bulk_read" else 0
        with cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream):  # as plugins/launch.py
            module.get_function(name)(grid, block, params + (np.uint64(out.data_ptr()),), shared_mem=shared)

    def stream(tensor, name="stream_read"):
        sms = torch.cuda.get_device_properties(tensor.device).multi_processor_count
        launch(name, (sms * 8,), (256,), np.uint64(tensor.data_ptr()), np.int64(tensor.numel() * tensor.element_size() // 16))

    launch.out = out  # a CTA writes its slot only if a thread's XOR of what it read is READ_MARK (tests plant one)
    launch.stream = stream
    return launch


def stream_read_us(launch, tensor) -> float:
    """Median µs of the faster of the plain reads (STREAM_READS) of a tensor's bytes, timed by ``bench``."""
    return min(bench(lambda name=name: launch.stream(tensor, name)) for name in STREAM_READS)


def main(argv=None):
    shapes, out = shapes_and_out(argv)
    require_cuda("read_floor")
    launch = read_kernels()

    def time_read(name, grid, block, *params):
        """Median µs of one read kernel (captured in the timing graph)."""
        return bench(lambda: launch(name, grid, block, *params))

    table = Table([f"# Read floor of the packed INT4 weight (g{BLOCK}) on {torch.cuda.get_device_name()}", "",
             "| N | K | packed MB | fp16 M=1 µs | stream read µs | stream TB/s | pattern read µs | pattern TB/s | "
             "pattern + x µs | pattern 4x128B µs | bulk read µs | bulk TB/s | int4 M=1 µs | tactic | "
             "fp16 / stream read | fp16 / bulk read | fp16 / pattern + x | fp16 / int4 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"], out)
    for N, K in shapes:
        w, b, s = _weights(N, K)
        w16 = w.half()
        x = torch.randn(1, K, device="cuda", dtype=torch.float16)
        nbytes = b.numel()
        t16 = bench(lambda: torch.nn.functional.linear(x, w16))
        rows = (np.uint64(b.data_ptr()), np.int32(nbytes // N), np.int32(nbytes // N // 64))
        t_stream = stream_read_us(launch, b)
        t_pattern = time_read("pattern_read", (N // 32,), (128,), *rows)
        t_px = time_read("pattern_x_read", (N // 32,), (128,), rows[0], np.uint64(x.data_ptr()), *rows[1:])
        t_p128 = time_read("pattern128_read", (N // 32,), (128,), *rows)
        t_bulk = time_read("bulk_read", (N // 32,), (160,), *rows[:2])
        best, t4 = fastest_tactic([n for n in TACTICS if n.startswith(("mma", "gemv"))], x, b, s)
        row = (f"| {N} | {K} | {nbytes / 1e6:.1f} | {t16:.1f} | {t_stream:.1f} | {nbytes / t_stream / 1e6:.2f} | "
               f"{t_pattern:.1f} | {nbytes / t_pattern / 1e6:.2f} | {t_px:.1f} | {t_p128:.1f} | {t_bulk:.1f} | "
               f"{nbytes / t_bulk / 1e6:.2f} | {t4:.1f} | {best} | {t16 / t_stream:.2f}x | {t16 / t_bulk:.2f}x | "
               f"{t16 / t_px:.2f}x | {t16 / t4:.2f}x |")
        table.add(row)
    table.write()


if __name__ == "__main__":
    main()
