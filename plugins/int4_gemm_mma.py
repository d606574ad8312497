"""INT4 weight-only GEMM for small M, hand-written in CUDA C++: register-direct ``mma.sync`` operands.

Why not Triton: at M <= 16 the weight stream is the whole cost, and the Triton tactics spend it on
moving operands (gpu_notes.md, sessions 3-4): the tensor-core tactics pass x and the dequantized
weight through shared memory (ldmatrix, a CTA barrier per K step, 16 rows of x for one real row),
and the CUDA-core GEMV issues ~5 instructions per weight. Here every thread loads its own packed
weights with 16-byte loads and feeds them, dequantized, straight into the B registers of
``mma.sync.m16n8k16``: no shared memory in the K loop, no barrier, ~2 instructions per weight.

The trick that makes the register path possible without re-laying out the weights: a dot product
may visit K in any order as long as both operands agree. The fragment of ``m16n8k16`` gives lane
``(g, t)`` (g = lane / 4, t = lane % 4) the B elements ``k in {2t, 2t+1, 2t+8, 2t+9}`` of column g.
Lane t of a quad reads the 16 packed bytes of chunk ``4s + t`` (32 consecutive k) of weight row g,
and its 8-nibble words become the pairs (k0, k4), (k1, k5), (k2, k6), (k3, k7) (one mask each under
the exponent of 1024.0 / 128.0, as in int4_gemm.py, so ``q - zp`` is exact). Each word thus makes
two MMAs' B fragments, and the A fragment (x rows g and g + 8) is x at exactly the same k, which the
lane also loads itself (64 contiguous bytes per row) and pairs with one ``prmt`` per register.

Swap-AB (``SWAP``): the same loads, but the MMA computes W x^T. Tiles 2p and 2p + 1 of a warp (weight
rows g and g + 8 of lane (g, t)) are the 16 rows of the A fragment, which asks for exactly the k of the
B fragment above, and x (token g, then g + 8 when M > 8) is the B fragment. At M <= 8 one MMA then
covers 16 weight rows instead of 8 (half the MMAs of the plain form, whose A rows 8-15 are padding),
and each output element of a lane belongs to one of its own two weight rows, so the scales it applies
after the MMA are one per tile (the plain form needs the scales of two output columns per tile).

Launch geometry: a CTA owns ``8 * NT`` weight rows (NT n8 tiles) and one 16-row tile of x; its
``WARPS`` warps take interleaved 128-wide K spans, each warp's fp32 accumulators are summed across
warps through shared memory once at the end, and the next span's weights and x are loaded before
the current span is multiplied (registers, one span ahead). Correct for any M (grid y = cdiv(M,
16)) but meant for M <= 16: for larger M the 16-row x tile is re-read per CTA.

Supports any (K, block_size) with ``block_size % 32 == 0`` (so a 32-weight chunk lies in one quant
group; per-channel counts when the padded K is a multiple of 32) and ``K % 8 == 0`` (16-byte x
loads); :func:`supports` says so, and the Triton tactics cover the rest. Groups of 32 or 64 multiply
the scale into the 16-bit weight, as the tensor-core tactics do; groups that hold whole 128-wide spans
apply it to each span's fp32 partial sums.
This module never imports Triton or graph code: it returns CUDA source and its launch geometry;
``aot.py`` compiles it with NVRTC into the same :class:`~qcompiler.plugins.aot.AotKernel` as the
Triton kernels.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .cuda_source import fill, weight_layout

__all__ = ["Int4MmaConfig", "INT4_MMA_TACTICS", "supports", "kernel_source", "MMA_M", "PTX_ISA", "ARCH",
           "PROGRAMMATIC_LAUNCH"]

logger = logging.getLogger(__name__)

MMA_M = 16  # rows of x per CTA (the m of m16n8k16)
PTX_ISA = "7.8"  # the newest PTX features used: sub/mul.rn.bf16x2, griddepcontrol (CUDA 11.8 and later load it)
ARCH = "compute_90"
PROGRAMMATIC_LAUNCH = True  # the kernel waits (griddepcontrol.wait) before its first memory access


@dataclass(frozen=True)
class Int4MmaConfig:
    """One tactic of the register-direct kernel.

    Attributes:
        NT: n8 tiles per warp (a warp owns 8 * NT weight rows; its x loads are shared by the NT tiles).
        WARPS: warps per CTA: WN along N (each its own rows, all walking the same K spans, so x comes
            from L1 for all but the first) times WARPS / WN along K (interleaved 128-wide spans, summed
            through shared memory at the end: more bytes in flight per SM).
        WN: warps along N (divides WARPS).
        DEPTH: span buffers in registers per warp; DEPTH - 1 spans of loads are in flight while one is
            multiplied.
        L2_256B: ask L2 to fetch 256-byte sector groups on a weight miss (neighbouring warps read the
            rest of the row's 256 bytes right after).
        SWAP: multiply W x^T instead of x W^T: pairs of the warp's n8 tiles make the 16 rows of the MMA's A
            operand and 8 tokens its n, so at M <= 8 one MMA covers 16 weight rows (half the MMAs), and a lane
            scales only its own two weight rows (half the scale loads). NT must be even.
    """

    NT: int
    WARPS: int
    WN: int = 1
    DEPTH: int = 2
    L2_256B: bool = True
    SWAP: bool = False

    def __post_init__(self):
        if self.NT not in (1, 2, 4, 8) or self.WARPS not in (1, 2, 4, 8, 16) or self.WARPS % self.WN:
            raise ValueError(f"Int4MmaConfig: NT in (1, 2, 4, 8), WARPS in (1, 2, 4, 8, 16), WN | WARPS; got {self}")
        if self.DEPTH not in (2, 3, 4):
            raise ValueError(f"Int4MmaConfig: DEPTH in (2, 3, 4), got {self.DEPTH}")
        if self.SWAP and self.NT % 2:
            raise ValueError(f"Int4MmaConfig: SWAP pairs n8 tiles into m16 tiles, so NT must be even; got {self.NT}")
        if self.reduction_bytes > 48 * 1024:
            raise ValueError(f"Int4MmaConfig: {self} needs {self.reduction_bytes} B of static shared memory (> 48 KiB)")

    @property
    def rows(self) -> int:
        """Weight rows per CTA."""
        return 8 * self.NT * self.WN

    @property
    def tokens(self) -> int:
        """Rows of x per CTA (grid y = cdiv(M, tokens))."""
        return MMA_M

    @property
    def num_warps(self) -> int:
        return self.WARPS

    @property
    def dynamic_shared_bytes(self) -> int:
        return 0  # the cross-warp reduction buffer is static

    @property
    def reduction_bytes(self) -> int:
        return 0 if self.WARPS == self.WN else self.WARPS * self.NT * 4 * 32 * 4

    def describe(self) -> str:
        return (f"mma {self.rows} rows x {self.WARPS} warps (WN {self.WN}) "
                f"depth {self.DEPTH}{' L2:256B' if self.L2_256B else ''}{' swap' if self.SWAP else ''}")


# Each was fastest (or within 3% of it) at >= 1 point of M in {1, 4, 8, 16} x the four benchmark shapes on an H100,
# among the session-6 tactics and their swap-AB forms (benchmarks/gpu_notes.md, session 14). mma_n8_w8 is also the
# one tactic for weights of 8-31 rows.
INT4_MMA_TACTICS: dict[str, Int4MmaConfig] = {
    "mma_n8_w8": Int4MmaConfig(1, 8),
    "mma_n32_w16": Int4MmaConfig(4, 16),
    "mma_n16_w8_d3_sw": Int4MmaConfig(2, 8, DEPTH=3, SWAP=True),
    "mma_n32_w4_sw": Int4MmaConfig(4, 4, SWAP=True),
    "mma_n32_w16_sw": Int4MmaConfig(4, 16, SWAP=True),
}


def supports(cfg: Int4MmaConfig, N: int, K: int, block_size: int) -> bool:
    """Whether a tactic takes this weight: 32-weight chunks inside one group, 16-byte rows of x, and
    at least one CTA's worth of rows (the last CTA moves back to end at row N)."""
    return block_size % 32 == 0 and K % 8 == 0 and K > 0 and N >= cfg.rows


_SOURCE = r"""
#define BF16 @BF16@
#define NT @NT@
#define WARPS @WARPS@
#define BLOCK_SIZE @BLOCK_SIZE@
#define HAS_ZP @HAS_ZP@
#define HAS_BIAS @HAS_BIAS@
#define N_ @N@
#define K_ @K@
#define ROW_BYTES @ROW_BYTES@          // packed bytes per (padded) weight row
#define NBLK @NBLK@                    // quant groups per row
#define ZSTRIDE @ZSTRIDE@              // zero-point bytes per row
#define CHUNKS (ROW_BYTES / 16)        // 32-weight chunks per row
#define SPANS ((CHUNKS + 3) / 4)       // 128-weight spans per row (a quad's step)
#define EVEN_K @EVEN_K@              // K % 128 == 0 and no padding: no predicate in the K loop
#define WN @WN@                        // warps along N
#define WK (WARPS / WN)                // warps along K
#define DEPTH @DEPTH@                  // span buffers per warp
#define SCALE_AFTER (BLOCK_SIZE % 128 == 0)  // a quad's 128-wide span lies in one group
#define SWAP @SWAP@                    // weights as the MMA's A operand (m16 = two n8 tiles), tokens as its n
#define ROW_SCALES (SWAP || !SCALE_AFTER)   // a lane needs the scales of its own weight rows g + 8 j only

@HALF2_HELPERS@

// Packed weights are read once: keep them out of L1 (and optionally have L2 fetch 256-byte groups).
__device__ __forceinline__ v4 load_weights(const u8* p) {
  v4 r;
  asm volatile("ld.global.nc.L1::no_allocate@L2HINT@.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(r.a), "=r"(r.b), "=r"(r.c), "=r"(r.d) : "l"(p));
  return r;
}

// x is re-read by every CTA: the default (L1-cached) read-only path; zero outside K when ok is false.
__device__ __forceinline__ v4 load_x(const u16* p, bool ok) {
  v4 r = {0u, 0u, 0u, 0u};
  if (ok)
    asm volatile("ld.global.nc.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(r.a), "=r"(r.b), "=r"(r.c), "=r"(r.d) : "l"(p));
  return r;
}

__device__ __forceinline__ u32 fma2(u32 a, u32 b, u32 c) {
  u32 d;
  asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

__device__ __forceinline__ void mma(float* c, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32." DT "." DT ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// One 128-wide K span as this lane sees it: its 32 packed weights of each tile's row, x rows g and
// g + 8 at the same 32 k, and the scales (and packed zero points) it needs.
struct Span {
  v4 w[NT];
  v4 xa[4], xb[4];
#if ROW_SCALES
  u16 s[NT];           // scale of the lane's weight row of each tile
#else
  u16 s0[NT], s1[NT];  // scales of the lane's two output columns (2t, 2t + 1) of each tile
#endif
#if HAS_ZP
  u8 z[NT];
#endif
};

// The lane's base addresses; tile j adds the compile-time 8 * j rows, so every load is base + immediate.
struct Rows {
  const u8* w;    // B + (n0 + g) * ROW_BYTES + 16 t
  const u16* s;   // S + (n0 + g) * NBLK (ROW_SCALES) or S + (n0 + 2t) * NBLK (output columns 2t, 2t + 1)
  const u8* z;    // ZP + (n0 + g) * ZSTRIDE
  const u16* xa;  // X + row(g) * K + 32 t (rows past M clamped to M - 1: computed, never stored)
  const u16* xb;  // the same for row g + 8
};

__device__ __forceinline__ int group_of(int span, int t) {
#if SCALE_AFTER
  return (128 * span) / BLOCK_SIZE;
#else
  return (32 * (4 * span + t)) / BLOCK_SIZE;
#endif
}

// TWO: the CTA has rows g + 8 of x (M - m0 > 8); otherwise their A registers are zero and never loaded.
template <bool TWO>
__device__ __forceinline__ void load_span(Span& sp, const Rows& r, int span, int t) {
#if EVEN_K
  const int w_off = 64 * span;
#else
  const int c = min(4 * span + t, CHUNKS - 1);  // x is zero past K, so these (valid) weights add nothing
  const int w_off = 16 * (c - t);
#endif
#pragma unroll
  for (int j = 0; j < NT; ++j) sp.w[j] = load_weights(r.w + w_off + 8 * j * ROW_BYTES);
#pragma unroll
  for (int v = 0; v < 4; ++v) {
#if EVEN_K
    const bool in_k = true;
#else
    const bool in_k = 32 * (4 * span + t) + 8 * v < K_;  // K % 8 == 0: a 16-byte piece is all in or all out
#endif
    sp.xa[v] = load_x(r.xa + 128 * span + 8 * v, in_k);
    if (TWO) sp.xb[v] = load_x(r.xb + 128 * span + 8 * v, in_k);
  }
  const int grp = min(group_of(span, t), NBLK - 1);
#pragma unroll
  for (int j = 0; j < NT; ++j) {
#if ROW_SCALES
    sp.s[j] = r.s[8 * j * NBLK + grp];
#else
    sp.s0[j] = r.s[8 * j * NBLK + grp];
    sp.s1[j] = r.s[8 * j * NBLK + NBLK + grp];
#endif
#if HAS_ZP
    sp.z[j] = r.z[8 * j * ZSTRIDE + (grp >> 1)];
#endif
  }
}

// The zero point of a weight row as the constants dequant_word subtracts, both halves.
struct Zero {
  u32 lo;  // 1024 + zp (128 + zp)
  u32 hi;  // fp16: -(64 + zp), added to the high nibble read as 1024 + 16 q and scaled by 1/16
};

__device__ __forceinline__ Zero zero_of(const Span& sp, int j, int grp) {
#if HAS_ZP
  const u32 zp = (sp.z[j] >> ((grp & 1) * 4)) & 0xFu;
#else
  const u32 zp = 8u;
#endif
  return {(MAGIC2 | zp) | (zp << 16), (0xD400u | (zp << 4)) * 0x00010001u};
}

// One packed word (8 nibbles) -> the pairs (k0, k4), (k1, k5), (k2, k6), (k3, k7) as q - zp, times scale2 when
// the scale goes into the weight.
__device__ __forceinline__ void dequant_word(u32 (&b)[4], u32 w, Zero z, u32 scale2) {
#if BF16
  b[0] = sub2(lop_mask_magic_lo(w), z.lo);
  b[1] = sub2(lop_mask_magic_lo(w >> 4), z.lo);
  b[2] = sub2(lop_mask_magic_lo(w >> 8), z.lo);
  b[3] = sub2(lop_mask_magic_lo(w >> 12), z.lo);
#else
  // fp16: the high nibble stays in bits 4-7 (1024 + 16 q), and q - zp = h / 16 - (64 + zp), exact.
  const u32 w8 = w >> 8;
  b[0] = sub2(lop_mask_magic_lo(w), z.lo);
  b[1] = fma2(lop_mask_magic_hi(w), 0x2C002C00u, z.hi);  // x 1/16
  b[2] = sub2(lop_mask_magic_lo(w8), z.lo);
  b[3] = fma2(lop_mask_magic_hi(w8), 0x2C002C00u, z.hi);
#endif
#if !SCALE_AFTER
  b[0] = mul2(b[0], scale2); b[1] = mul2(b[1], scale2); b[2] = mul2(b[2], scale2); b[3] = mul2(b[3], scale2);
#endif
}

template <bool TWO>
__device__ __forceinline__ void mma_span(float (&acc)[NT][4], const Span& sp, int span, int t) {
  // x paired like the weight nibbles, (k0, k4), (k1, k5), (k2, k6), (k3, k7) per 8 k: the A fragments of rows
  // g and g + 8 of x, or (SWAP) the B fragments of tokens g and g + 8.
  u32 pa[16], pb[16];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const u32* ra = &sp.xa[i].a;
    const u32* rb = &sp.xb[i].a;
    pa[4 * i + 0] = prmt(ra[0], ra[2], 0x5410u); pa[4 * i + 1] = prmt(ra[0], ra[2], 0x7632u);
    pa[4 * i + 2] = prmt(ra[1], ra[3], 0x5410u); pa[4 * i + 3] = prmt(ra[1], ra[3], 0x7632u);
    if (TWO) {
      pb[4 * i + 0] = prmt(rb[0], rb[2], 0x5410u); pb[4 * i + 1] = prmt(rb[0], rb[2], 0x7632u);
      pb[4 * i + 2] = prmt(rb[1], rb[3], 0x5410u); pb[4 * i + 3] = prmt(rb[1], rb[3], 0x7632u);
    } else {
      pb[4 * i + 0] = pb[4 * i + 1] = pb[4 * i + 2] = pb[4 * i + 3] = 0u;
    }
  }
  const int grp = group_of(span, t);
#if SWAP
  // Tiles 2p and 2p + 1 (weight rows g and g + 8 of an m16 tile) are the A operand; tokens g (and g + 8) the B.
  // acc[2p + tt]: rows (g, g + 8) x tokens (8 tt + 2t, + 1).
#pragma unroll
  for (int p = 0; p < NT / 2; ++p) {
    const Zero z0 = zero_of(sp, 2 * p, grp), z1 = zero_of(sp, 2 * p + 1, grp);
#if SCALE_AFTER
    float part[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
    float* dst0 = part[0];
    float* dst1 = part[1];
    const u32 scale0 = 0u, scale1 = 0u;
#else
    float* dst0 = acc[2 * p];
    float* dst1 = acc[2 * p + 1];
    const u32 scale0 = (u32)sp.s[2 * p] * 0x00010001u, scale1 = (u32)sp.s[2 * p + 1] * 0x00010001u;
#endif
    const u32* w0 = &sp.w[2 * p].a;
    const u32* w1 = &sp.w[2 * p + 1].a;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      u32 b[4], c[4];
      dequant_word(b, w0[i], z0, scale0);
      dequant_word(c, w1[i], z1, scale1);
      mma(dst0, b[0], c[0], b[1], c[1], pa[4 * i + 0], pa[4 * i + 1]);
      mma(dst0, b[2], c[2], b[3], c[3], pa[4 * i + 2], pa[4 * i + 3]);
      if (TWO) {
        mma(dst1, b[0], c[0], b[1], c[1], pb[4 * i + 0], pb[4 * i + 1]);
        mma(dst1, b[2], c[2], b[3], c[3], pb[4 * i + 2], pb[4 * i + 3]);
      }
    }
#if SCALE_AFTER
    const float s0 = from_16(sp.s[2 * p]), s1 = from_16(sp.s[2 * p + 1]);
#pragma unroll
    for (int tt = 0; tt < 2; ++tt) {
      acc[2 * p + tt][0] += s0 * part[tt][0]; acc[2 * p + tt][1] += s0 * part[tt][1];
      acc[2 * p + tt][2] += s1 * part[tt][2]; acc[2 * p + tt][3] += s1 * part[tt][3];
    }
#endif
  }
#else
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    const Zero z = zero_of(sp, j, grp);
#if SCALE_AFTER
    float part[4] = {0.f, 0.f, 0.f, 0.f};
    float* dst = part;
    const u32 scale2 = 0u;
#else
    float* dst = acc[j];
    const u32 scale2 = (u32)sp.s[j] * 0x00010001u;
#endif
    const u32* wq = &sp.w[j].a;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      u32 b[4];
      dequant_word(b, wq[i], z, scale2);
      mma(dst, pa[4 * i + 0], pb[4 * i + 0], pa[4 * i + 1], pb[4 * i + 1], b[0], b[1]);
      mma(dst, pa[4 * i + 2], pb[4 * i + 2], pa[4 * i + 3], pb[4 * i + 3], b[2], b[3]);
    }
#if SCALE_AFTER
    const float s0 = from_16(sp.s0[j]), s1 = from_16(sp.s1[j]);
    acc[j][0] += s0 * part[0]; acc[j][1] += s1 * part[1];
    acc[j][2] += s0 * part[2]; acc[j][3] += s1 * part[3];
#endif
  }
#endif
}

// The warp's spans wk, wk + WK, ...: DEPTH span buffers in turn (a rotation unrolled at compile time, so no
// register moves), DEPTH - 1 spans of loads in flight while one is multiplied.
// One step: start loading the span DEPTH - 1 ahead into NXT (the buffer multiplied last), multiply CUR.
#define STEP(CUR, NXT)                                                      \
  load_span<TWO>(NXT, r, min(s + (DEPTH - 1) * WK, SPANS - 1), t);          \
  mma_span<TWO>(acc, CUR, s, t);                                            \
  s += WK;                                                                  \
  if (s >= SPANS) return;

template <bool TWO>
__device__ __forceinline__ void k_loop(float (&acc)[NT][4], const Rows& r, int wk, int t) {
  if (wk >= SPANS) return;
  Span b0, b1;
  load_span<TWO>(b0, r, wk, t);
  int s = wk;
#if DEPTH == 2
  for (;;) { STEP(b0, b1) STEP(b1, b0) }
#elif DEPTH == 3
  Span b2;
  load_span<TWO>(b1, r, min(wk + WK, SPANS - 1), t);
  for (;;) { STEP(b0, b2) STEP(b1, b0) STEP(b2, b1) }
#else
  Span b2, b3;
  load_span<TWO>(b1, r, min(wk + WK, SPANS - 1), t);
  load_span<TWO>(b2, r, min(wk + 2 * WK, SPANS - 1), t);
  for (;;) { STEP(b0, b3) STEP(b1, b0) STEP(b2, b1) STEP(b3, b2) }
#endif
}

extern "C" __global__ void __launch_bounds__(WARPS * 32) @NAME@(
    const u16* __restrict__ X, const u8* __restrict__ B, const u16* __restrict__ S,
#if HAS_ZP
    const u8* __restrict__ ZP,
#endif
#if HAS_BIAS
    const u16* __restrict__ BIAS,
#endif
    int M, u16* __restrict__ Y) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int wn = warp % WN, wk = warp / WN;  // neighbouring warps: other rows, same K spans (x shared in L1)
  // The last CTA moves back to end at row N (N >= 8 NT WN): it recomputes, and rewrites with the same
  // values, a few rows of its neighbour instead of clamping rows, which keeps tile offsets immediate.
  const int n0 = min(blockIdx.x * (8 * NT * WN), N_ - 8 * NT * WN) + 8 * NT * wn;
  const int m0 = blockIdx.y * 16;
  // Programmatic dependent launch (no-ops for a plain launch): the next grid in the stream may start now, its CTAs
  // taking SM slots as ours retire (it waits in turn), and this grid touches no memory before the grids it depends
  // on have finished and flushed. Across back-to-back calls that hides one call's start-up behind the last one's tail.
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  asm volatile("griddepcontrol.wait;" ::: "memory");

  Rows r;
  r.w = B + (long long)(n0 + g) * ROW_BYTES + 16 * t;
#if ROW_SCALES
  r.s = S + (long long)(n0 + g) * NBLK;
#else
  r.s = S + (long long)(n0 + 2 * t) * NBLK;
#endif
#if HAS_ZP
  r.z = ZP + (long long)(n0 + g) * ZSTRIDE;
#else
  r.z = 0;
#endif
  r.xa = X + (long long)min(m0 + g, M - 1) * K_ + 32 * t;
  r.xb = X + (long long)min(m0 + g + 8, M - 1) * K_ + 32 * t;
  float acc[NT][4];
#pragma unroll
  for (int j = 0; j < NT; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;

  if (M - m0 > 8)
    k_loop<true>(acc, r, wk, t);
  else
    k_loop<false>(acc, r, wk, t);

  // Sum the K warps' partial tiles, then write: c0, c1 -> (row g, cols 2t, 2t+1), c2, c3 -> row g + 8 (SWAP: rows
  // g, g + 8 x tokens 2t, 2t + 1).
#if WK > 1
  __shared__ float red[WARPS * NT * 4 * 32];  // [wk][wn][NT * 4 * 32]
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int q = 0; q < 4; ++q) red[(warp * NT * 4 + j * 4 + q) * 32 + lane] = acc[j][q];
  __syncthreads();
  for (int idx = threadIdx.x; idx < WN * NT * 4 * 32; idx += WARPS * 32) {
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < WK; ++w) v += red[w * WN * NT * 4 * 32 + idx];
    const int l = idx & 31, jr = (idx >> 5) % (NT * 4);
    const int nw = min(blockIdx.x * (8 * NT * WN), N_ - 8 * NT * WN) + 8 * NT * (idx / (NT * 4 * 32));
#else
  for (int idx = 0; idx < NT * 4; ++idx) {
    const float v = acc[idx >> 2][idx & 3];
    const int l = lane, jr = idx;
    const int nw = n0;
#endif
#if SWAP
    const int m = m0 + 8 * ((jr >> 2) & 1) + 2 * (l & 3) + (jr & 1);  // acc[2p + tt][q]: see mma_span
    const int n = nw + 16 * (jr >> 3) + (l >> 2) + 8 * ((jr & 3) >> 1);
#else
    const int m = m0 + (l >> 2) + 8 * ((jr & 3) >> 1);
    const int n = nw + 8 * (jr >> 2) + 2 * (l & 3) + (jr & 1);
#endif
    if (m < M) {
#if HAS_BIAS
      Y[(long long)m * N_ + n] = to_out(v + from_16(BIAS[n]));
#else
      Y[(long long)m * N_ + n] = to_out(v);
#endif
    }
  }
}
"""


def _even_k(K: int, block_size: int) -> bool:
    return K % 128 == 0 and K % block_size == 0


def kernel_name(cfg: Int4MmaConfig, dtype: str, N: int, K: int, block_size: int, has_zp: bool, has_bias: bool
                ) -> str:
    return (f"qc_int4_mma_{'bf16' if dtype == 'bfloat16' else 'f16'}_n{cfg.rows}_w{cfg.WARPS}n{cfg.WN}d{cfg.DEPTH}"
            f"{'_l2' if cfg.L2_256B else ''}{'_swap' if cfg.SWAP else ''}_{N}x{K}_g{block_size}{'_zp' if has_zp else ''}"
            f"{'_bias' if has_bias else ''}")


def kernel_source(cfg: Int4MmaConfig, dtype: str, N: int, K: int, block_size: int, has_zp: bool, has_bias: bool
                  ) -> tuple[str, str]:
    """(entry name, CUDA C++ source) of one plugin configuration; N, K and the group are compiled in.

    Parameters in launch order: X, B, scales, [zero_points], [bias], M, Y (absent optional inputs are
    compiled out, like the Triton kernels' constexpr None).

    Raises:
        ValueError: a dtype other than float16/bfloat16, or a weight :func:`supports` refuses.
    """
    if dtype not in ("float16", "bfloat16"):
        raise ValueError(f"Int4Gemm mma kernel: dtype must be float16/bfloat16, got {dtype}")
    if not supports(cfg, N, K, block_size):
        raise ValueError(f"Int4Gemm mma kernel {cfg.describe()}: needs block_size % 32 == 0, K % 8 == 0 and "
                         f"N >= {cfg.rows}; got N={N}, K={K}, block_size={block_size}")
    name = kernel_name(cfg, dtype, N, K, block_size, has_zp, has_bias)
    subs = {"@NAME@": name, "@BF16@": str(int(dtype == "bfloat16")), "@NT@": str(cfg.NT),
            "@WARPS@": str(cfg.WARPS), "@BLOCK_SIZE@": str(block_size), "@HAS_ZP@": str(int(has_zp)),
            "@HAS_BIAS@": str(int(has_bias)), "@EVEN_K@": str(int(_even_k(K, block_size))),
            "@N@": str(N), "@K@": str(K), **weight_layout(K, block_size),
            "@L2HINT@": ".L2::256B" if cfg.L2_256B else "", "@WN@": str(cfg.WN), "@DEPTH@": str(cfg.DEPTH),
            "@SWAP@": str(int(cfg.SWAP))}
    return name, fill(_SOURCE, subs)

