"""INT4 weight-only GEMM for prefill-sized M, hand-written in CUDA C++: swap-AB ``wgmma`` with the
dequantized weight as the register A operand.

Why not Triton: Hopper's tensor cores are fed at full rate only by ``wgmma``, and the Triton tactics
lose the overlap between dequantizing and multiplying (gpu_notes.md, session 5): ptxas serialises
their register-operand wgmmas (C7515: the loop-carried accumulators are touched by non-wgmma
instructions), so every MMA waits for the next tile's dequantization, ~440 TFLOP/s at best against
cuBLAS fp16's ~700. Here the loop is written so that cannot happen: the accumulators are only ever
written by wgmma, the next tile's A registers are a second, distinct buffer (the loop is unrolled by
two), and the wait for the previous tile's MMAs comes after this tile's MMAs are issued, so one tile's
dequantization runs on the CUDA cores while the other tile's MMAs run on the tensor cores.

The product is ``Y^T = W . X^T``: a CTA owns ``64 * WG`` weight rows (one 64-row wgmma A slice per
warpgroup) and ``MT`` rows of x (wgmma's N). Per 64-wide K step, cp.async brings the x tile (K-major,
128-byte swizzle: wgmma's B operand read straight from shared memory) and the CTA's packed weight
bytes into one of ``STAGES`` shared-memory stages; every lane then builds its A fragment from the
packed bytes in the MatMulNBits order (no re-layout): the fragment wants, per k16 step, k = 2t, 2t+1
(byte t of the row's 8-byte step) and 2t+8, 2t+9 (byte t + 4), so one ``prmt`` picks those two bytes
and one more puts each byte's two nibbles in the two halves under the exponent of 1024.0 (128.0 for
bf16), where ``q - zp`` is one exact subtraction and the scale one multiply (the numerics of every
other path). Nothing is staged as 16-bit weights, so shared memory holds x and 4-bit bytes only.

Warp-specialised form (``WS``): one more warpgroup only loads. Its copies are one base address plus a constant
each (per-copy index arithmetic on the multiplying warps' schedulers measured as the critical path), it hands
stages over through mbarriers, and the multiplying warpgroups release a stage once the wait that retires its MMAs
returns, so the K loop has no CTA barrier; ``setmaxnreg`` moves registers from the producer to them. With ``KS``
sets of multiplying warpgroups the K steps are dealt out in turn and the sets' sums added at the end (split-K
inside the CTA).

Supports ``block_size % 32 == 0`` (a 16-byte chunk lies in one padded row), ``K % 8 == 0`` (16-byte
cp.async of x) and ``N >= 64 * WG`` (the last CTA moves back to end at row N). Needs sm_90a (wgmma):
the PTX targets ``compute_90a``. This module never imports Triton or graph code.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .cuda_source import consumer_registers, fill, weight_layout

__all__ = ["Int4WgmmaConfig", "INT4_WGMMA_TACTICS", "supports", "kernel_source", "PTX_ISA", "ARCH"]

logger = logging.getLogger(__name__)

PTX_ISA = "8.0"  # wgmma and fence.proxy.async (CUDA 12.0 drivers load it)
ARCH = "compute_90a"
PROGRAMMATIC_LAUNCH = False  # reads its inputs without griddepcontrol.wait: plain launches only
_SMEM_LIMIT = 227 * 1024


@dataclass(frozen=True)
class Int4WgmmaConfig:
    """One tactic of the swap-AB wgmma kernel.

    Attributes:
        WG: warpgroups per CTA, each 64 weight rows (the CTA owns 64 * WG rows).
        MT: rows of x per CTA (wgmma's N: 64, 128 or 256; accumulators are MT / 2 registers per thread).
        STAGES: shared-memory stages; STAGES - 2 K steps of loads are in flight while one is multiplied
            and the previous one's MMAs drain (with a producer, up to STAGES - 1).
        WS: warp-specialised: one more warpgroup (the producer, 40 registers after ``setmaxnreg``) loads the
            stages and hands them over through mbarriers, so the warpgroups that multiply issue no loads and
            never meet at a CTA barrier.
        KS: sets of WG multiplying warpgroups along K (warp-specialised only): K step kt goes to set kt % KS, and
            the sets add their partial sums in shared memory at the end. More multiplying warps per SM without
            more CTAs, for grids that leave SMs idle (split-K without a workspace or a second kernel). It pays
            only with deep pipelines: each set holds two stages, and the L2 latency under load is long.
    """

    WG: int
    MT: int
    STAGES: int = 4
    WS: bool = False
    KS: int = 1

    def __post_init__(self):
        if self.WG not in (1, 2) or self.MT not in (64, 128, 192, 256) or not 3 <= self.STAGES <= 12:
            raise ValueError(f"Int4WgmmaConfig: WG in (1, 2), MT in (64, 128, 192, 256), 3 <= STAGES <= 12; got {self}")
        # A set holds its stage and the one before; each set's accumulators, A buffers and weights need registers.
        if self.KS not in (1, 2, 3, 4) or (self.KS > 1 and (not self.WS or self.WG * self.KS > 4 or
                                                             self.STAGES < self.KS + 2 or
                                                             self.consumer_registers < self.MT // 2 + 64)):
            raise ValueError(f"Int4WgmmaConfig: KS > 1 needs WS, WG * KS <= 4, STAGES >= KS + 2 and "
                             f"{self.MT // 2 + 64} registers per multiplying thread; got {self}")
        if self.shared_bytes > _SMEM_LIMIT:
            raise ValueError(f"Int4WgmmaConfig: {self} needs {self.shared_bytes} B of shared memory (> 227 KiB)")

    @property
    def rows(self) -> int:
        """Weight rows per CTA."""
        return 64 * self.WG

    @property
    def tokens(self) -> int:
        """Rows of x per CTA (grid y = cdiv(M, tokens))."""
        return self.MT

    @property
    def num_warps(self) -> int:
        return 4 * (self.WG * self.KS + self.WS)

    @property
    def consumer_registers(self) -> int:
        """Registers per multiplying thread after ``setmaxnreg`` (warp-specialised with two warpgroups)."""
        return consumer_registers(32 * self.num_warps, self.WG * self.KS)

    @property
    def dynamic_shared_bytes(self) -> int:
        return self.shared_bytes

    @property
    def stage_bytes(self) -> int:
        return self.MT * 128 + self.rows * 32  # x tile (MT x 64 x 2 B) + packed weights (rows x 32 B)

    @property
    def out_tile_bytes(self) -> int:
        """The epilogue's output tile (it reuses the stages); with KS > 1 the other sets' fp32 sums follow it."""
        return self.MT * (self.rows + 8) * 2

    @property
    def barriers_offset(self) -> int:
        """Where the producer's mbarriers sit: past the stages and the epilogue's tiles, which reuse them."""
        return max(self.STAGES * self.stage_bytes, self.out_tile_bytes + (self.KS - 1) * self.MT * self.rows * 4)

    @property
    def shared_bytes(self) -> int:
        # +1024: the dynamic window is aligned up to the 128-byte swizzle's 1024-byte atom in the kernel.
        return self.barriers_offset + (16 * self.STAGES if self.WS else 0) + 1024

    def describe(self) -> str:
        return (f"wgmma {self.rows} rows x {self.MT} tokens, {self.STAGES} stages{', producer' if self.WS else ''}"
                f"{f', K split {self.KS}' if self.KS > 1 else ''}")


# Each was fastest (or within 3% of it) at >= 1 point of M in {256, 1024, 4096} x the four benchmark shapes among
# the 24 swept on an H100 (benchmarks/gpu_notes.md, session 7); wgmma_64x64 is there for 64 < M < 256. The 128 x 256
# tile is warp-specialised since session 9 (0.91-1.02x fp16 at M >= 256 on the benchmark shapes, against
# 0.84-0.96x without the producer, side by side in one run). wgmma_64x128_k2 (session 10) is for grids that leave
# SMs idle: at M = 256 on N = 4096 it ran 1.03x / 1.07x fp16 (K = 11008 / 4096) in its sweep, against 0.89x /
# 0.93x with 6 stages, and 0.82x with one multiplying warpgroup and 12 stages (K = 11008).
INT4_WGMMA_TACTICS: dict[str, Int4WgmmaConfig] = {
    "wgmma_128x256": Int4WgmmaConfig(2, 256, 4, WS=True),
    "wgmma_64x128": Int4WgmmaConfig(1, 128, 6),
    "wgmma_64x128_s4": Int4WgmmaConfig(1, 128, 4),
    "wgmma_64x64": Int4WgmmaConfig(1, 64, 4),
    "wgmma_64x128_k2": Int4WgmmaConfig(1, 128, 12, WS=True, KS=2),
}


def supports(cfg: Int4WgmmaConfig, N: int, K: int, block_size: int) -> bool:
    """Whether a tactic takes this weight (see the module docstring)."""
    return block_size % 32 == 0 and K % 8 == 0 and K > 0 and N >= cfg.rows


def _wgmma_asm(mt: int, dtype: str) -> str:
    """The inline-asm statement of one ``wgmma m64n{mt}k16`` with A in registers (acc[] += A . B)."""
    n_acc = mt // 2
    acc = ", ".join(f"%{i}" for i in range(n_acc))
    a = ", ".join(f"%{n_acc + i}" for i in range(4))
    outs = ", ".join(f'"+f"(acc[{i}])' for i in range(n_acc))
    return (f'asm volatile("{{ .reg .pred p; setp.ne.b32 p, %{n_acc + 5}, 0; '
            f'wgmma.mma_async.sync.aligned.m64n{mt}k16.f32.{dtype}.{dtype} '
            f'{{{acc}}}, {{{a}}}, %{n_acc + 4}, p, 1, 1, 0; }}"\n'
            f'    : {outs}\n'
            f'    : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(desc), "r"(1));')


_SOURCE = r"""
#define BF16 @BF16@
#define WG @WG@
#define MT @MT@
#define STAGES @STAGES@
#define BLOCK_SIZE @BLOCK_SIZE@
#define HAS_ZP @HAS_ZP@
#define HAS_BIAS @HAS_BIAS@
#define N_ @N@
#define K_ @K@
#define ROW_BYTES @ROW_BYTES@          // packed bytes per (padded) weight row, a multiple of 16
#define NBLK @NBLK@
#define ZSTRIDE @ZSTRIDE@
#define ROWS (64 * WG)
#define WS @WS@                       // 1: a producer warpgroup loads the stages (mbarrier pipeline)
#define KS @KS@                       // sets of WG multiplying warpgroups along K (K step kt goes to set kt % KS)
#define RTHREADS (128 * WG)            // threads of one set
#define CTHREADS (RTHREADS * KS)       // threads that dequantize and multiply
#define THREADS (CTHREADS + 128 * WS)
#define REGS_PRODUCER 40
#define REGS_CONSUMER @REGS_CONSUMER@
#define BARS_OFFSET @BARS_OFFSET@      // the mbarriers, past both the stages and the epilogue's tile
#define KTILES ((K_ + 63) / 64)
#define LSTEPS ((KTILES + KS - 1) / KS)  // K steps per set; with KS > 1 the last may be past K (x reads as zero)
#define X_BYTES (MT * 128)
#define STAGE_BYTES (X_BYTES + ROWS * 32)
#define EVEN_K (K_ % 64 == 0 && ROW_BYTES == K_ / 2 && KS * LSTEPS == KTILES)
#define OUT_STRIDE (ROWS + 8)          // epilogue tile row (halves): +16 B keeps the four t lanes off one bank

@HALF2_HELPERS@

@WGMMA_HELPERS@

@PIPELINE_HELPERS@

__device__ __forceinline__ void wgmma(float* acc, u32 a0, u32 a1, u32 a2, u32 a3, u64 desc) {
@WGMMA@
}

// wgmma reads its register operand after it is issued, until the wait that retires it; to the compiler the
// asm consumed them at issue, so it could hand those registers to other values meanwhile. A use after the
// wait keeps them allocated until then.
__device__ __forceinline__ void keep_until_here(const u32 (&a)[16]) {
  asm volatile("" :: "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(a[4]), "r"(a[5]), "r"(a[6]), "r"(a[7]),
               "r"(a[8]), "r"(a[9]), "r"(a[10]), "r"(a[11]), "r"(a[12]), "r"(a[13]), "r"(a[14]), "r"(a[15]));
}

// Scale (and zero point) of one weight row for the K step's two 32-wide halves (equal unless BLOCK_SIZE == 32).
struct Quant {
  u16 s[2];
#if HAS_ZP
  u8 z[2];
#endif
};

__device__ __forceinline__ void load_quant(Quant& q, const u16* __restrict__ S, const u8* __restrict__ ZP, int row,
                                           int kt) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int grp = min((64 * kt + 32 * h) / BLOCK_SIZE, NBLK - 1);
    q.s[h] = S[row * NBLK + grp];
#if HAS_ZP
    q.z[h] = (ZP[row * ZSTRIDE + (grp >> 1)] >> (4 * (grp & 1))) & 0xF;
#endif
  }
}

// The lane's A fragments for the 4 k16 steps of one K step, from its rows' 32 packed bytes (wa: row g, wb: g + 8).
__device__ __forceinline__ void dequant(u32 (&a)[16], const v4 (&w)[4], const Quant& qa, const Quant& qb, int t) {
  const u32 pick = (u32)t | ((u32)(t + 4) << 4);  // byte t of a word, byte t of the next word
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const Quant& q = r ? qb : qa;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int h = j >> 1;
#if HAS_ZP
      const u32 z = q.z[h];
#else
      const u32 z = 8u;
#endif
      const u32 zz = MAGIC2 | z | (z << 16);
      const u32 s2 = (u32)q.s[h] * 0x00010001u;
      const u32* wd = &w[2 * r + h].a;
      const u32 v = prmt(wd[2 * (j & 1)], wd[2 * (j & 1) + 1], pick);  // [byte t, byte t + 4] of the step
      const u32 v4s = v >> 4;
      // (lo nibble, hi nibble) of each byte into the two halves: k = 2t, 2t+1 and k = 2t+8, 2t+9.
      const u32 lo = mul2(sub2(lop_mask_magic_lo(prmt(v, v4s, 0x0400u)), zz), s2);
      const u32 hi = mul2(sub2(lop_mask_magic_lo(prmt(v, v4s, 0x0501u)), zz), s2);
      // fragment registers per k16 step: (row g, k 2t..), (row g+8, k 2t..), (row g, k 2t+8..), (row g+8, ...)
      a[4 * j + r] = lo;
      a[4 * j + 2 + r] = hi;
    }
  }
}

extern "C" __global__ void __launch_bounds__(THREADS, 1) @NAME@(
    const u16* __restrict__ X, const u8* __restrict__ B, const u16* __restrict__ S,
#if HAS_ZP
    const u8* __restrict__ ZP,
#endif
#if HAS_BIAS
    const u16* __restrict__ BIAS,
#endif
    int M, u16* __restrict__ Y) {
#if !HAS_ZP
  const u8* ZP = 0;
#endif
  extern __shared__ u8 smem_raw[];
  const u32 raw = smem_addr(smem_raw);
  const u32 base = (raw + 1023u) & ~1023u;
  u8* const smem = smem_raw + (base - raw);

  const int tid = threadIdx.x, lane = tid & 31;
  const int n0 = min((int)blockIdx.x * ROWS, N_ - ROWS);
  const int m0 = blockIdx.y * MT;
  // cp.async of a stage: x chunk q = tid % 8 of rows tid / 8 + i * LOADERS / 8 (LOADERS / 8 is a multiple of 8, so
  // the swizzle phase (tid / 8) % 8 is fixed); the CTA's weights: row tid / 2 + 64 i, 16-byte half tid % 2 of the
  // K step's 32 bytes. Past the padded row the weights are never used with nonzero x (x is zero from K on): read
  // chunk 0 instead.
  const int q = tid & 7, xr = tid >> 3;
  const u32 x_dst = xr * 128 + ((q ^ (xr & 7)) << 4);
  const u8* const w_src = B + (long long)(n0 + (tid >> 1)) * ROW_BYTES + 16 * (tid & 1);
  const u32 w_dst = X_BYTES + (tid >> 1) * 32 + 16 * (tid & 1);
  auto w_offset = [&](int kt) { return 32 * kt + 16 * (tid & 1) < ROW_BYTES ? 32 * kt : -16 * (tid & 1); };

#if WS
  const u32 bars = base + BARS_OFFSET;
  auto full = [&](int st) { return bars + 8 * st; };
  auto empty = [&](int st) { return bars + 8 * (STAGES + st); };
  // full: the producer's 128 cp.async arrivals; empty: a warp of the set of multiplying warpgroups that used it.
  if (tid == 0) {
    for (int st = 0; st < STAGES; ++st) {
      mbar_init(full(st), 128);
      mbar_init(empty(st), 4 * WG);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  if (tid < 128) {  // producer warpgroup: every copy is a base address plus a constant (it shares issue slots)
#if WG * KS > 1
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" :: "n"(REGS_PRODUCER));
#endif
    const bool whole_tile = m0 + MT <= M;
    const u16* const x_src = X + (long long)min(m0 + xr, M - 1) * K_ + 8 * q;
    Slot sl;
#pragma unroll 1
    for (int kt = 0; kt < KS * LSTEPS; ++kt, sl.next()) {
      if (kt >= STAGES) mbar_wait(empty(sl.stage), sl.phase ^ 1);  // the consumers released its previous use
      const u32 st = base + sl.stage * STAGE_BYTES;
      const bool x_ok = EVEN_K || 64 * kt + 8 * q < K_;
      if (whole_tile) {
#pragma unroll
        for (int i = 0; i < MT / 16; ++i)
          cp_async16(st + x_dst + i * 2048, x_ok ? x_src + 64 * kt + (long long)i * 16 * K_ : X, x_ok);
      } else {  // the last token tile: rows past M read row M - 1 (their products are never stored)
#pragma unroll 1
        for (int i = 0; i < MT / 16; ++i)
          cp_async16(st + x_dst + i * 2048, x_ok ? X + (long long)min(m0 + xr + 16 * i, M - 1) * K_ + 8 * q + 64 * kt : X,
                     x_ok);
      }
      const int off = w_offset(kt);
#pragma unroll
      for (int i = 0; i < WG; ++i) cp_async16(st + w_dst + i * 64 * 32, w_src + off + (long long)i * 64 * ROW_BYTES, true);
      cp_async_arrive(full(sl.stage));
    }
    asm volatile("cp.async.wait_all;" ::: "memory");  // the last arrivals must fire before this thread exits
    return;
  }
#if WG * KS > 1
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" :: "n"(REGS_CONSUMER));
#endif
  // KS = 1 keeps the plain warp-specialised kernel's code (the set index computed at run time measured 6-11% slower).
#if KS > 1
  const int ctid = tid - 128, kset = ctid / RTHREADS, rtid = ctid % RTHREADS;
  Slot cur;
  for (int i = 0; i < kset; ++i) cur.next();
#else
  const int ctid = tid - 128, kset = 0, rtid = ctid;
  Slot cur;
#endif
  int prev_stage = 0;
#else
  const int ctid = tid, kset = 0, rtid = tid;
  const u16* x_src[MT * 8 / THREADS];
#pragma unroll
  for (int i = 0; i < MT * 8 / THREADS; ++i) x_src[i] = X + (long long)min(m0 + xr + i * (THREADS / 8), M - 1) * K_ + 8 * q;

  auto load_stage = [&](int kt) {
    if (kt < KTILES) {
      const u32 st = base + (kt % STAGES) * STAGE_BYTES;
      const bool x_ok = EVEN_K || 64 * kt + 8 * q < K_;
#pragma unroll
      for (int i = 0; i < MT * 8 / THREADS; ++i)
        cp_async16(st + x_dst + i * THREADS * 16, x_ok ? x_src[i] + 64 * kt : X, x_ok);
      cp_async16(st + w_dst, w_src + w_offset(kt), true);
    }
    cp_async_commit();
  };
#endif
  const int warp = rtid >> 5, g = lane >> 2, t = lane & 3;
  const int wrow = 16 * warp + g;  // the lane's weight row in the CTA (and wrow + 8); warpgroup w owns 64 w..
  const int row_a = n0 + wrow, row_b = row_a + 8;

  float acc[MT / 2];
#pragma unroll
  for (int i = 0; i < MT / 2; ++i) acc[i] = 0.f;

#if !WS
#pragma unroll
  for (int p = 0; p < STAGES - 2; ++p) load_stage(p);
#endif

  Quant qa, qb;
  load_quant(qa, S, ZP, row_a, kset);
  load_quant(qb, S, ZP, row_b, kset);
  u32 a_even[16], a_odd[16];
#pragma unroll
  for (int i = 0; i < 16; ++i) a_odd[i] = 0u;  // kept alive (below) before its first use

  // Local K step KK (K step KS * KK + kset) into the A buffer AB: wait for its stage (and, without a producer, refill the stage freed two steps
  // ago), dequantize, issue the 4 MMAs, then wait until WAIT groups of MMAs are pending (1: the previous step's
  // retire, so the A buffer PREV and its stage become free; 0 on the last step).
#if WS
#define STAGE_READY(KK)                                                                     \
  mbar_wait(full(cur.stage), cur.phase);                                                    \
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  /* cp.async writes -> wgmma reads */ \
  const u32 st = base + cur.stage * STAGE_BYTES;
#define STAGE_DONE(KK)                                                                      \
  if ((KK) > 0 && lane == 0) mbar_arrive(empty(prev_stage));                                \
  prev_stage = cur.stage;                                                                   \
  NEXT_SLOT();
#else
#define STAGE_READY(KK)                                                                     \
  cp_async_wait<STAGES - 3>();                                                              \
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");                             \
  __syncthreads();                                                                          \
  load_stage((KK) + STAGES - 2);                                                            \
  const u32 st = base + ((KK) % STAGES) * STAGE_BYTES;
#define STAGE_DONE(KK)
#endif
#if KS > 1
#define NEXT_SLOT() _Pragma("unroll") for (int i = 0; i < KS; ++i) cur.next()
#else
#define NEXT_SLOT() cur.next()
#endif
#define K_STEP(KK, AB, PREV, WAIT)                                                          \
  {                                                                                         \
    STAGE_READY(KK)                                                                         \
    v4 w[4];                                                                                \
    w[0] = lds128(st + X_BYTES + wrow * 32);                                                \
    w[1] = lds128(st + X_BYTES + wrow * 32 + 16);                                           \
    w[2] = lds128(st + X_BYTES + (wrow + 8) * 32);                                          \
    w[3] = lds128(st + X_BYTES + (wrow + 8) * 32 + 16);                                     \
    dequant(AB, w, qa, qb, t);                                                              \
    if ((KK) + 1 < LSTEPS) {                                                                \
      load_quant(qa, S, ZP, row_a, KS * ((KK) + 1) + kset);                                 \
      load_quant(qb, S, ZP, row_b, KS * ((KK) + 1) + kset);                                 \
    }                                                                                       \
    wgmma_fence();                                                                          \
    const u64 desc = make_desc(st);                                                         \
    _Pragma("unroll") for (int j = 0; j < 4; ++j)                                           \
      wgmma(acc, AB[4 * j], AB[4 * j + 1], AB[4 * j + 2], AB[4 * j + 3], desc + 2 * j);     \
    wgmma_commit();                                                                         \
    wgmma_wait<WAIT>();                                                                     \
    keep_until_here(PREV);                                                                  \
    STAGE_DONE(KK)                                                                          \
  }

  // The last two steps are peeled so that the final wait_group 0 sits right after the last MMAs with no branch
  // around it: ptxas 13.0 moved the epilogue's accumulator reads above a wait_group 0 placed after the loop,
  // and made a conditional in-loop wait a full drain on every other step (both seen in the SASS; the first
  // measured as the last K step's MMAs going missing for most tokens). An odd step count takes its extra step
  // first: peeled at the end instead, ptxas serialized every MMA (C7513). The CPU tests check all three.
#if LSTEPS == 1
  K_STEP(0, a_even, a_odd, 0)
#else
#if LSTEPS % 2
  K_STEP(0, a_odd, a_even, 1)
  int kt = 1;
#else
  int kt = 0;
#endif
#pragma unroll 1  // unrolled, ptxas may also serialize the MMAs
  for (; kt + 2 < LSTEPS; kt += 2) {
    K_STEP(kt, a_even, a_odd, 1)
    K_STEP(kt + 1, a_odd, a_even, 1)
  }
  K_STEP(kt, a_even, a_odd, 1)
  K_STEP(kt + 1, a_odd, a_even, 0)
#endif
  keep_until_here(a_even);
  keep_until_here(a_odd);
#if WS
  named_sync(1, CTHREADS);  // every consumer is done with the stages (the producer has left): reuse them
#if KS > 1
  float* const partial = (float*)(smem + @OUT_TILE_BYTES@);  // the other sets' sums, past the output tile
  if (kset > 0)
#pragma unroll
    for (int i = 0; i < MT / 2; ++i) partial[((kset - 1) * MT / 2 + i) * RTHREADS + rtid] = acc[i];
  named_sync(1, CTHREADS);
  if (kset == 0)
#pragma unroll
    for (int s = 1; s < KS; ++s)
#pragma unroll
      for (int i = 0; i < MT / 2; ++i) acc[i] += partial[((s - 1) * MT / 2 + i) * RTHREADS + rtid];
#endif
#else
  cp_async_wait<0>();
  __syncthreads();  // every warpgroup is done with the stages: reuse them for the output tile
#endif

  // Transpose through shared memory: acc[4 i + e] is (weight row wrow (+8 for e >= 2), token 8 i + 2 t + (e & 1)).
  u16* out = (u16*)smem;
#if KS > 1
  if (kset == 0)
#endif
#pragma unroll
  for (int i = 0; i < MT / 8; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int n = wrow + 8 * (e >> 1), m = 8 * i + 2 * t + (e & 1);
      float v = acc[4 * i + e];
#if HAS_BIAS
      v += from_16(BIAS[n0 + n]);
#endif
      out[m * OUT_STRIDE + n] = to_out(v);
    }
  named_sync(1, CTHREADS);
#if N_ % 8 == 0
  for (int idx = ctid; idx < MT * (ROWS / 8); idx += CTHREADS) {
    const int m = idx / (ROWS / 8), c = idx % (ROWS / 8);
    if (m0 + m < M)
      *(v4*)(Y + (long long)(m0 + m) * N_ + n0 + 8 * c) = *(const v4*)(out + m * OUT_STRIDE + 8 * c);
  }
#else  // rows of Y are not 16-byte aligned
  for (int idx = ctid; idx < MT * ROWS; idx += CTHREADS) {
    const int m = idx / ROWS, n = idx % ROWS;
    if (m0 + m < M) Y[(long long)(m0 + m) * N_ + n0 + n] = out[m * OUT_STRIDE + n];
  }
#endif
}
"""


def kernel_name(cfg: Int4WgmmaConfig, dtype: str, N: int, K: int, block_size: int, has_zp: bool, has_bias: bool
                ) -> str:
    return (f"qc_int4_wgmma_{'bf16' if dtype == 'bfloat16' else 'f16'}_r{cfg.rows}_m{cfg.MT}_s{cfg.STAGES}"
            f"{'_ws' if cfg.WS else ''}{f'_k{cfg.KS}' if cfg.KS > 1 else ''}_{N}x{K}_g{block_size}"
            f"{'_zp' if has_zp else ''}{'_bias' if has_bias else ''}")


def kernel_source(cfg: Int4WgmmaConfig, dtype: str, N: int, K: int, block_size: int, has_zp: bool, has_bias: bool
                  ) -> tuple[str, str]:
    """(entry name, CUDA C++ source) of one plugin configuration; N, K and the group are compiled in.

    Parameters in launch order: X, B, scales, [zero_points], [bias], M, Y. Dynamic shared memory:
    ``cfg.shared_bytes``; grid (cdiv(N, rows), cdiv(M, MT)); block ``32 * cfg.num_warps`` threads.

    Raises:
        ValueError: a dtype other than float16/bfloat16, or a weight :func:`supports` refuses.
    """
    if dtype not in ("float16", "bfloat16"):
        raise ValueError(f"Int4Gemm wgmma kernel: dtype must be float16/bfloat16, got {dtype}")
    if not supports(cfg, N, K, block_size):
        raise ValueError(f"Int4Gemm wgmma kernel {cfg.describe()}: needs block_size % 32 == 0, K % 8 == 0 and "
                         f"N >= {cfg.rows}; got N={N}, K={K}, block_size={block_size}")
    name = kernel_name(cfg, dtype, N, K, block_size, has_zp, has_bias)
    subs = {"@NAME@": name, "@BF16@": str(int(dtype == "bfloat16")), "@WG@": str(cfg.WG), "@MT@": str(cfg.MT),
            "@STAGES@": str(cfg.STAGES), "@WS@": str(int(cfg.WS)), "@KS@": str(cfg.KS),
            "@OUT_TILE_BYTES@": str(cfg.out_tile_bytes),
            "@REGS_CONSUMER@": str(cfg.consumer_registers), "@BARS_OFFSET@": str(cfg.barriers_offset),
            "@BLOCK_SIZE@": str(block_size), "@HAS_ZP@": str(int(has_zp)),
            "@HAS_BIAS@": str(int(has_bias)), "@N@": str(N), "@K@": str(K), **weight_layout(K, block_size),
            "@WGMMA@": _wgmma_asm(cfg.MT, "bf16" if dtype == "bfloat16" else "f16")}
    return name, fill(_SOURCE, subs)
