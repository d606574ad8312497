"""Attention for decode steps on Hopper: few queries over a long KV cache, split over a thread-block cluster.

The prefill kernels (flash_attention.py, flash_attention_wgmma.py) give each CTA 64-128 query rows of one head
and walk every key. A decode step has one query per head: B * Hq CTAs then stream the whole cache each, the
heads of a GQA group reading the same K/V, and at batch 1 a few dozen CTAs cannot pull the H100's bandwidth
(measured 1.5-9.4x slower than this kernel: benchmarks/results/attention_decode_h100.md).

Here one CTA takes the GQA group's query heads times ``QT`` queries (``ROWS`` <= 16 rows: one m16 MMA tile) of
one KV head, and the CLUSTER CTAs of a thread-block cluster split that KV head's keys between them. Each CTA
streams its share of K and V through STAGES shared-memory stages of 128 keys (cp.async); each of its 4 warps
takes 32 keys of a stage: S = Q K^T with ``mma.sync`` m16n8k16 (Q's A fragments held in registers, K read as
B fragments from padded rows), an online softmax of its own, and O += P V with P's S-accumulator fragments as
the A operand and V through ``ldmatrix.trans``. The warps' (row max, row sum, O) are merged in the CTA, and the
CTAs' in distributed shared memory, each CTA merging a slice of the output from all of them. A split-KV
reduction needs no global workspace this way, so the kernel stays one launch with nothing beyond the op's
inputs and outputs, as a TensorRT AOT plugin requires; the cluster shape is compiled in (``__cluster_dims__``),
so a plain launch forms the clusters.

Semantics are ops.FLASH_ATTENTION's, like the other tactics: dense, padded (``seqlens_k``) or key-masked batches
of contiguous [B, H, S, D] tensors, GQA/MQA, bottom-right aligned causal mask, O and the natural-log LSE (O = 0,
LSE = -inf for a row that sees no key). Any Sq is correct (grid y covers the queries ``QT`` at a time); it is
meant for decode steps. With a key_mask the CTAs of a cluster first scan a share of its batch row each and merge
the first and last kept key in distributed shared memory; the cluster splits the tiles between them (left or right
padding is never loaded); holes are masked per key.
Head dims 64 and 128, fp16/bf16, a positive scale. Needs sm_90. This module never imports Triton or graph code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .cuda_source import check_attention_arguments, fill, float_literal

__all__ = ["AttnDecodeConfig", "ATTN_DECODE_TACTICS", "supports", "kernel_source", "PTX_ISA", "ARCH"]

PTX_ISA = "8.0"  # clusters, mapa and barrier.cluster
ARCH = "compute_90"
PROGRAMMATIC_LAUNCH = False
_SMEM_LIMIT = 227 * 1024
_WARPS, _KEYS = 4, 128  # keys per tile: 32 per warp
_MAX_ROWS = 16


@dataclass(frozen=True)
class AttnDecodeConfig:
    """One tactic of the decode kernel for one head dim.

    Attributes:
        D: head dim (64 or 128).
        CLUSTER: CTAs per cluster, splitting one KV head's keys (1, 2, 4 or 8: portable cluster sizes).
        STAGES: K/V tiles of 128 keys in flight per CTA.
        QT: queries per CTA (its rows: QT times the GQA group).
    """

    D: int
    CLUSTER: int = 8
    STAGES: int = 2
    QT: int = 1

    def __post_init__(self):
        if self.D not in (64, 128) or self.CLUSTER not in (1, 2, 4, 8) or self.STAGES < 2 or self.QT < 1:
            raise ValueError(f"AttnDecodeConfig: D in (64, 128), CLUSTER in (1, 2, 4, 8), STAGES >= 2, QT >= 1; got {self}")

    @property
    def num_warps(self) -> int:
        return _WARPS

    def rows(self, gqa: int) -> int:
        return gqa * self.QT

    def dynamic_shared_bytes(self, gqa: int) -> int:
        tiles = self.STAGES * (2 * _KEYS * (self.D + 8) * 2 + _KEYS * 4)  # K, V (padded rows), key_mask
        q_tile = 16 * (self.D + 8) * 2
        rows = self.rows(gqa)
        partials = 4 * (_WARPS + 1) * (2 * 16 + rows * self.D)  # row max, row sum and O of each warp and of the CTA
        return tiles + q_tile + partials

    def describe(self) -> str:
        return f"decode c{self.CLUSTER} d{self.D} s{self.STAGES} q{self.QT}"


# Measured on an H100 (benchmarks/gpu_notes.md, session 20): clusters of 8 CTAs are fastest while a step has few
# (batch, KV head) pairs (batch 1 with 8 KV heads: 8 clusters), of 2 or 1 once those pairs fill the GPU (batch 16-64),
# where 8 cost up to 2x; TensorRT's autotuner times each for the profile.
ATTN_DECODE_TACTICS: dict[str, AttnDecodeConfig] = {
    "decode_d64": AttnDecodeConfig(64, 8, 3),
    "decode_d64_c2": AttnDecodeConfig(64, 2, 3),
    "decode_d64_c1": AttnDecodeConfig(64, 1, 2),
    "decode_d128": AttnDecodeConfig(128, 8, 2),
    "decode_d128_c2": AttnDecodeConfig(128, 2, 2),
    "decode_d128_c1": AttnDecodeConfig(128, 1, 2),
}


def supports(cfg: AttnDecodeConfig, head_dim: int, scale: float, gqa: int) -> bool:
    """Whether a tactic takes this attention (``scale`` 0 means 1/sqrt(D)); ``gqa`` query heads per KV head."""
    return (head_dim == cfg.D and scale >= 0.0 and 1 <= cfg.rows(gqa) <= _MAX_ROWS
            and cfg.dynamic_shared_bytes(gqa) <= _SMEM_LIMIT)


_SOURCE = r"""
#define BF16 @BF16@
#define D @D@
#define GQA @GQA@
#define QT @QT@
#define ROWS (GQA * QT)
#define HQ @HQ@
#define HKV (HQ / GQA)
#define BN 128                   // keys per tile: 32 per warp
#define THREADS 128
#define WARPS 4
#define STAGES @STAGES@
#define CLUSTER @CLUSTER@
#define CAUSAL @CAUSAL@
#define PADDED @PADDED@
#define KEYMASK @KEYMASK@
#define SCALE_LOG2 @SCALE_LOG2@  // softmax scale * log2(e): the exponentials are exp2
#define LD (D + 8)               // tile row stride (16-bit elements): 8 rows of one 16-byte column hit distinct banks
#define NEG_INF __int_as_float(0xff800000)
#define LN2 0.6931471805599453f

@HALF2_HELPERS@

@WGMMA_HELPERS@

@SOFTMAX_HELPERS@

// c (16x8, f32) += a (16x16) . b (16x8): the m16n8k16 fragments.
__device__ __forceinline__ void mma16816(float* c, const u32* a, u32 b0, u32 b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." DT "." DT ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};" : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void ldmatrix_x4_trans(u32* r, u32 addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}

__device__ __forceinline__ u32 lds32(const u16* p) { return *(const u32*)p; }

__device__ __forceinline__ u32 cluster_rank() {
  u32 r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
  return r;
}

// Every thread of every CTA of the cluster: writes before it are visible to the cluster's reads after it.
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}

// A float of CTA ``rank``'s shared memory, at the address ``p`` has in this CTA's.
__device__ __forceinline__ float ld_cluster(const float* p, u32 rank) {
  u32 remote;
  float v;
  // not volatile: the loads of a merge are independent and may be in flight together (cluster_sync orders them)
  asm("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(smem_addr(p)), "r"(rank));
  asm("ld.shared::cluster.f32 %0, [%1];" : "=f"(v) : "r"(remote));
  return v;
}

extern "C" __global__ void __cluster_dims__(CLUSTER, 1, 1) __launch_bounds__(THREADS, 1)
@NAME@(const u16* __restrict__ Q, const u16* __restrict__ K, const u16* __restrict__ V,
#if PADDED
       const int* __restrict__ SEQLENS_K,
#endif
#if KEYMASK
       const int* __restrict__ KEY_MASK,
#endif
       int SQ, int SK, u16* __restrict__ O, float* __restrict__ LSE) {
  extern __shared__ __align__(16) unsigned char smem[];
  u16* k_tiles = (u16*)smem;                             // [STAGES][BN][LD]
  u16* v_tiles = k_tiles + STAGES * BN * LD;             // [STAGES][BN][LD]
  u16* q_tile = v_tiles + STAGES * BN * LD;              // [16][LD]: the rows, zero past ROWS and SQ
  int* mask_tiles = (int*)(q_tile + 16 * LD);            // [STAGES][BN]
  float* part_m = (float*)(mask_tiles + STAGES * BN);    // [WARPS][16]: each warp's row max, row sum and O
  float* part_l = part_m + WARPS * 16;                   // [WARPS][16]
  float* part_o = part_l + WARPS * 16;                   // [WARPS][ROWS][D]
  float* cta_m = part_o + WARPS * ROWS * D;              // [ROWS]: the CTA's, merged from its warps' and
  float* cta_l = cta_m + ROWS;                           // [ROWS]   read by the whole cluster
  float* cta_o = cta_l + ROWS;                           // [ROWS][D]
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t4 = lane & 3;
  const u32 rank = cluster_rank();
  const int b = blockIdx.z / HKV, kvh = blockIdx.z % HKV, q0 = blockIdx.y * QT;
  int kend = SK;  // keys past kend do not exist for this batch entry
#if PADDED
  kend = min(max(SEQLENS_K[b], 0), SK);
#endif
  int kstop = kend;  // no row of this CTA sees a key past kstop
#if CAUSAL
  kstop = max(0, min(kend, min(q0 + QT, SQ) + kend - SQ));
#endif
  int t_first = 0, t_stop = (kstop + BN - 1) / BN;  // the key tiles this CTA's cluster walks
#if KEYMASK
  {  // from the first to the last kept key: left or right padding is never loaded, and the CTAs share what is kept
    __shared__ int kept_lo, kept_hi;
    if (tid == 0) {
      kept_lo = 0x7fffffff;
      kept_hi = -1;
    }
    __syncthreads();
    int lo = 0x7fffffff, hi = -1;
    const int share = (kstop + CLUSTER - 1) / CLUSTER;  // each CTA of the cluster scans a share of the row
#pragma unroll 8
    for (int j = rank * share + tid; j < min(kstop, (int)(rank + 1) * share); j += THREADS) {
      if (KEY_MASK[(long long)b * SK + j] != 0) {
        lo = min(lo, j);
        hi = max(hi, j);
      }
    }
    if (hi >= 0) {
      atomicMin(&kept_lo, lo);
      atomicMax(&kept_hi, hi);
    }
    cluster_sync();
    lo = 0x7fffffff;
    hi = -1;
#pragma unroll
    for (int c = 0; c < CLUSTER; ++c) {
      lo = min(lo, __float_as_int(ld_cluster((const float*)&kept_lo, c)));
      hi = max(hi, __float_as_int(ld_cluster((const float*)&kept_hi, c)));
    }
    t_first = hi < 0 ? 0 : lo / BN;
    t_stop = hi < 0 ? 0 : hi / BN + 1;
  }
#endif
  const int per = (t_stop - t_first + CLUSTER - 1) / CLUSTER;
  const int t_begin = t_first + rank * per, t_end = min(t_stop, t_begin + per);

  // row r: query q0 + r / GQA of head kvh * GQA + r % GQA
  for (int i = tid; i < 16 * D; i += THREADS) {
    const int r = i / D, s = q0 + r / GQA, h = kvh * GQA + r % GQA;
    q_tile[r * LD + i % D] = r < ROWS && s < SQ ? Q[((long long)(b * HQ + h) * SQ + s) * D + i % D] : (u16)0;
  }
  const u16* k_head = K + (long long)(b * HKV + kvh) * SK * D;
  const u16* v_head = V + (long long)(b * HKV + kvh) * SK * D;
  auto load = [&](int t, int stage) {  // keys past kend are zero-filled and masked
    const int k0 = t * BN;
    for (int c = tid; c < BN * (D / 8); c += THREADS) {
      const int r = c / (D / 8), col = (c % (D / 8)) * 8;
      const bool ok = k0 + r < kend;
      const long long offset = (long long)(ok ? k0 + r : 0) * D + col;
      cp_async16(smem_addr(k_tiles + (stage * BN + r) * LD + col), k_head + offset, ok);
      cp_async16(smem_addr(v_tiles + (stage * BN + r) * LD + col), v_head + offset, ok);
    }
#if KEYMASK
    const bool ok = k0 + tid < kend;
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" :: "r"(smem_addr(mask_tiles + stage * BN + tid)),
                 "l"(KEY_MASK + (long long)b * SK + (ok ? k0 + tid : 0)), "r"(ok ? 4 : 0));
#endif
    cp_async_commit();
  };
#pragma unroll
  for (int i = 0; i < STAGES - 1; ++i) {
    if (t_begin + i < t_end) load(t_begin + i, i);
    else cp_async_commit();
  }
  __syncthreads();  // q_tile
  u32 qa[D / 16][4];  // Q as the A fragments of S = Q K^T, one per 16 columns
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks) {
    qa[ks][0] = lds32(q_tile + g * LD + ks * 16 + 2 * t4);
    qa[ks][1] = lds32(q_tile + (g + 8) * LD + ks * 16 + 2 * t4);
    qa[ks][2] = lds32(q_tile + g * LD + ks * 16 + 8 + 2 * t4);
    qa[ks][3] = lds32(q_tile + (g + 8) * LD + ks * 16 + 8 + 2 * t4);
  }
  // rows g and g + 8 of this thread's fragments: their query positions (or -1 past ROWS / SQ)
  int query[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = g + 8 * h;
    query[h] = r < ROWS && q0 + r / GQA < SQ ? q0 + r / GQA : -1;
  }
  // this warp's online softmax over its 32 keys of every tile: the row max (quad-uniform), this thread's share of
  // the row sum, and O's fragments (rows g, g + 8; columns 8 n + 2 t4, + 1)
  float m_run[2] = {NEG_INF, NEG_INF}, l_part[2] = {0.f, 0.f}, o[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;

  for (int t = t_begin; t < t_end; ++t) {
    const int stage = (t - t_begin) % STAGES;
    const int next = t + STAGES - 1;
    if (next < t_end) load(next, (next - t_begin) % STAGES);
    else cp_async_commit();
    cp_async_wait<STAGES - 1>();
    __syncthreads();
    const u16* k_tile = k_tiles + stage * BN * LD;
    const int kw = warp * 32;  // this warp's first key in the tile
    float s[4][4];
#pragma unroll
    for (int n = 0; n < 4; ++n) {
      s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
      const u16* k_row = k_tile + (kw + 8 * n + g) * LD + 2 * t4;
#pragma unroll
      for (int ks = 0; ks < D / 16; ++ks) mma16816(s[n], qa[ks], lds32(k_row + ks * 16), lds32(k_row + ks * 16 + 8));
    }
    float tile_max[2] = {NEG_INF, NEG_INF};
#pragma unroll
    for (int n = 0; n < 4; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int local = kw + 8 * n + 2 * t4 + (e & 1), key = t * BN + local, q = query[e >> 1];
        bool kept = q >= 0 && key < kend;
#if KEYMASK
        kept = kept && mask_tiles[stage * BN + local] != 0;
#endif
#if CAUSAL
        kept = kept && key <= q + kend - SQ;
#endif
        s[n][e] = kept ? s[n][e] * SCALE_LOG2 : NEG_INF;
        tile_max[e >> 1] = fmaxf(tile_max[e >> 1], s[n][e]);
      }
    }
    float alpha[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float m_new = fmaxf(m_run[h], quad_max(tile_max[h]));
      alpha[h] = m_new == NEG_INF ? 1.f : ex2(m_run[h] - m_new);
      m_run[h] = m_new;
      l_part[h] *= alpha[h];
    }
    u32 pa[2][4];  // P as the A fragments of O += P V, one per 16 keys
#pragma unroll
    for (int n = 0; n < 4; ++n) {
      float p[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        p[e] = m_run[e >> 1] == NEG_INF ? 0.f : ex2(s[n][e] - m_run[e >> 1]);
        l_part[e >> 1] += p[e];
      }
      pa[n >> 1][2 * (n & 1)] = pack2(p[0], p[1]);
      pa[n >> 1][2 * (n & 1) + 1] = pack2(p[2], p[3]);
    }
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      o[n][0] *= alpha[0];
      o[n][1] *= alpha[0];
      o[n][2] *= alpha[1];
      o[n][3] *= alpha[1];
    }
    const u16* v_tile = v_tiles + stage * BN * LD;
#pragma unroll
    for (int kk = 0; kk < 2; ++kk) {
      const int key = kw + 16 * kk + ((lane >> 3) & 1) * 8 + (lane & 7);
#pragma unroll
      for (int n = 0; n < D / 8; n += 2) {
        u32 vb[4];
        ldmatrix_x4_trans(vb, smem_addr(v_tile + key * LD + 8 * n + (lane >> 4) * 8));
        mma16816(o[n], pa[kk], vb[0], vb[1]);
        mma16816(o[n + 1], pa[kk], vb[2], vb[3]);
      }
    }
    __syncthreads();  // the stage is written again
  }
  cp_async_wait<0>();

  // this warp's partial result
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const float l = quad_sum(l_part[h]);
    const int r = g + 8 * h;
    if (t4 == 0) {
      part_m[warp * 16 + r] = m_run[h];
      part_l[warp * 16 + r] = l;
    }
    if (r < ROWS) {
#pragma unroll
      for (int n = 0; n < D / 8; ++n) {
        part_o[(warp * ROWS + r) * D + 8 * n + 2 * t4] = o[n][2 * h];
        part_o[(warp * ROWS + r) * D + 8 * n + 2 * t4 + 1] = o[n][2 * h + 1];
      }
    }
  }
  __syncthreads();
  // the CTA's partial result, merged from its warps'
  for (int i = tid; i < ROWS * D; i += THREADS) {
    const int r = i / D;
    float m[WARPS], row_max = NEG_INF;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) {
      m[w] = part_m[w * 16 + r];
      row_max = fmaxf(row_max, m[w]);
    }
    float l = 0.f, out = 0.f;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) {
      const float scale = m[w] == NEG_INF ? 0.f : ex2(m[w] - row_max);
      l += part_l[w * 16 + r] * scale;
      out += part_o[w * ROWS * D + i] * scale;
    }
    cta_o[i] = out;
    if (i % D == 0) {
      cta_m[r] = row_max;
      cta_l[r] = l;
    }
  }
  cluster_sync();
  // each CTA merges a slice of the output from every CTA of the cluster
  for (int i = rank * THREADS + tid; i < ROWS * D; i += THREADS * CLUSTER) {
    const int r = i / D, d = i % D, q = q0 + r / GQA, h = kvh * GQA + r % GQA;
    float m[CLUSTER], row_max = NEG_INF;
#pragma unroll
    for (int c = 0; c < CLUSTER; ++c) {
      m[c] = ld_cluster(cta_m + r, c);
      row_max = fmaxf(row_max, m[c]);
    }
    float l = 0.f, out = 0.f;
#pragma unroll
    for (int c = 0; c < CLUSTER; ++c) {
      const float w = m[c] == NEG_INF ? 0.f : ex2(m[c] - row_max);
      l += ld_cluster(cta_l + r, c) * w;
      out += ld_cluster(cta_o + i, c) * w;
    }
    if (q < SQ) {
      const long long row = (long long)(b * HQ + h) * SQ + q;
      O[row * D + d] = to_out(l > 0.f ? out / l : 0.f);
      if (d == 0) LSE[row] = l > 0.f ? (row_max + log2f(l)) * LN2 : NEG_INF;
    }
  }
  cluster_sync();  // no CTA leaves while another still reads its shared memory
}
"""


def kernel_source(cfg: AttnDecodeConfig, dtype: str, num_heads: int, kv_num_heads: int, causal: bool, scale: float,
                  has_seqlens_k: bool, has_key_mask: bool = False) -> tuple[str, str]:
    """(entry name, CUDA C++ source) of one plugin configuration; heads, head dim and scale are compiled in.

    Parameters in launch order: Q, K, V, [seqlens_k | key_mask], SQ, SK, O, LSE (contiguous [B, H, S, D] tensors, LSE
    [B, Hq, SQ]). Dynamic shared memory: ``cfg.dynamic_shared_bytes(num_heads // kv_num_heads)``; grid (CLUSTER,
    cdiv(SQ, QT), B * Hkv), clusters of (CLUSTER, 1, 1) compiled in; block 128 threads.

    Raises:
        ValueError: a dtype other than float16/bfloat16, heads that do not divide, or a head dim / scale / GQA group
            the tactic does not take.
    """
    check_attention_arguments("FlashAttention decode kernel", dtype, num_heads, kv_num_heads, has_seqlens_k, has_key_mask)
    gqa = num_heads // kv_num_heads
    if not supports(cfg, cfg.D, scale, gqa):
        raise ValueError(f"FlashAttention decode kernel {cfg.describe()}: needs a scale >= 0 (0: 1/sqrt(D)) and at most "
                         f"{_MAX_ROWS} rows (query heads per KV head x QT), got scale {scale}, {gqa} heads per KV head")
    scale = scale or 1.0 / math.sqrt(cfg.D)
    name = (f"qc_attn_decode_{'bf16' if dtype == 'bfloat16' else 'f16'}_d{cfg.D}_c{cfg.CLUSTER}_s{cfg.STAGES}_q{cfg.QT}"
            f"_h{num_heads}_kv{kv_num_heads}{'_causal' if causal else ''}{'_padded' if has_seqlens_k else ''}"
            f"{'_keymask' if has_key_mask else ''}")
    subs = {"@NAME@": name, "@BF16@": str(int(dtype == "bfloat16")), "@D@": str(cfg.D), "@GQA@": str(gqa),
            "@QT@": str(cfg.QT), "@HQ@": str(num_heads), "@STAGES@": str(cfg.STAGES), "@CLUSTER@": str(cfg.CLUSTER),
            "@CAUSAL@": str(int(causal)), "@PADDED@": str(int(has_seqlens_k)), "@KEYMASK@": str(int(has_key_mask)),
            "@SCALE_LOG2@": float_literal(scale * math.log2(math.e))}
    return name, fill(_SOURCE, subs)
