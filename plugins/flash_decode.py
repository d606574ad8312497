"""Attention for decode steps on Hopper: few queries over a long KV cache, split over a thread-block cluster.

The prefill kernels (flash_attention.py, flash_attention_wgmma.py) give each CTA 64-128 query rows of one head
and walk every key. A decode step has one query per head: B * Hq CTAs then stream the whole cache each, one
CTA per head of a GQA group reading the same K/V, and at batch 1 a few dozen CTAs cannot pull the H100's
bandwidth (measured 0.2-0.6x SDPA's split-KV kernels: benchmarks/results/attention_decode_h100.md).

Here one CTA takes the GQA group's query heads times ``QT`` queries (``ROWS`` <= 16 rows) of one KV head, and
the CLUSTER CTAs of a thread-block cluster split that KV head's keys between them. Each CTA streams its share
of K and V through STAGES shared-memory stages (cp.async), computes S = Q K^T and O += P V on the CUDA cores in
float32 (ROWS rows are too few for the tensor cores to matter: the loop is bound by memory), and keeps an
online softmax. The CTAs then merge their (row max, row sum, O) in distributed shared memory: each combines a
slice of the output from all of them. A split-KV reduction needs no global workspace this way, so the kernel
stays one launch with nothing beyond the op's inputs and outputs, as a TensorRT AOT plugin requires; the
cluster shape is compiled in (``__cluster_dims__``), so a plain launch forms the clusters.

Semantics are ops.FLASH_ATTENTION's, like the other tactics: dense, padded (``seqlens_k``) or key-masked batches
of contiguous [B, H, S, D] tensors, GQA/MQA, bottom-right aligned causal mask, O and the natural-log LSE (O = 0,
LSE = -inf for a row that sees no key). Any Sq is correct (grid y covers the queries ``QT`` at a time); it is
meant for Sq * Hq / Hkv <= 16 or so. Head dims 64 and 128, fp16/bf16, a positive scale. Needs sm_90.
This module never imports Triton or graph code.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

from .cuda_source import fill

__all__ = ["AttnDecodeConfig", "ATTN_DECODE_TACTICS", "supports", "kernel_source", "PTX_ISA", "ARCH"]

PTX_ISA = "8.0"  # clusters, mapa and barrier.cluster
ARCH = "compute_90"
PROGRAMMATIC_LAUNCH = False
_SMEM_LIMIT = 227 * 1024
_THREADS = 128  # one key of a 128-key tile per thread for S; one head-dim column (or half of one) for O
_MAX_ROWS = 16


@dataclass(frozen=True)
class AttnDecodeConfig:
    """One tactic of the decode kernel for one head dim.

    Attributes:
        D: head dim (64 or 128).
        CLUSTER: CTAs per cluster, splitting one KV head's keys (2-8: the portable cluster sizes).
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
        return _THREADS // 32

    def rows(self, gqa: int) -> int:
        return gqa * self.QT

    def dynamic_shared_bytes(self, gqa: int) -> int:
        rows = self.rows(gqa)
        tiles = self.STAGES * (2 * _THREADS * (self.D + 8) * 2 + _THREADS * 4)  # K, V (padded rows), key_mask
        return tiles + 4 * (rows * self.D + rows * _THREADS + rows * 4 + 2 * rows + rows * self.D)

    def describe(self) -> str:
        return f"decode c{self.CLUSTER} d{self.D} s{self.STAGES} q{self.QT}"


# Measured on an H100: benchmarks/results/attention_decode_h100.md.
ATTN_DECODE_TACTICS: dict[str, AttnDecodeConfig] = {
    "decode_d64": AttnDecodeConfig(64, 8, 3),
    "decode_d128": AttnDecodeConfig(128, 8, 2),
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
#define BN 128
#define THREADS 128
#define STAGES @STAGES@
#define CLUSTER @CLUSTER@
#define CAUSAL @CAUSAL@
#define PADDED @PADDED@
#define KEYMASK @KEYMASK@
#define SCALE_LOG2 @SCALE_LOG2@  // softmax scale * log2(e): the exponentials are exp2
#define LD (D + 8)               // K/V tile row stride (16-bit elements): a quarter-warp's 16-byte loads of 8 rows hit distinct banks
#define DP (THREADS / D)         // O += P V: key partitions of a tile (1 at d128, 2 at d64)
#define NEG_INF __int_as_float(0xff800000)
#define LN2 0.6931471805599453f

@HALF2_HELPERS@

@WGMMA_HELPERS@

__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

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
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(smem_addr(p)), "r"(rank));
  asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v) : "r"(remote) : "memory");
  return v;
}

__device__ __forceinline__ void unpack8(v4 w, float* f) {
  const u32 words[4] = {w.a, w.b, w.c, w.d};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[2 * i] = from_16((u16)(words[i] & 0xFFFFu));
    f[2 * i + 1] = from_16((u16)(words[i] >> 16));
  }
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
  u16* k_tiles = (u16*)smem;                       // [STAGES][BN][LD]
  u16* v_tiles = k_tiles + STAGES * BN * LD;       // [STAGES][BN][LD]
  int* mask_tiles = (int*)(v_tiles + STAGES * BN * LD);  // [STAGES][BN]
  float* q_rows = (float*)(mask_tiles + STAGES * BN);    // [ROWS][D], scaled into log2 units
  float* p_rows = q_rows + ROWS * D;               // [ROWS][BN]
  float* warp_red = p_rows + ROWS * BN;            // [ROWS][4]
  float* part_m = warp_red + ROWS * 4;             // [ROWS]: this CTA's row max, row sum and O, read by the cluster
  float* part_l = part_m + ROWS;
  float* part_o = part_l + ROWS;                   // [ROWS][D]
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
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
  const int tiles = (kstop + BN - 1) / BN, per = (tiles + CLUSTER - 1) / CLUSTER;
  const int t_begin = rank * per, t_end = min(tiles, t_begin + per);

  // row r: query q0 + r / GQA of head kvh * GQA + r % GQA
  for (int i = tid; i < ROWS * D; i += THREADS) {
    const int r = i / D, s = q0 + r / GQA, h = kvh * GQA + r % GQA;
    q_rows[i] = s < SQ ? from_16(Q[((long long)(b * HQ + h) * SQ + s) * D + i % D]) * SCALE_LOG2 : 0.f;
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

  float m_run[ROWS], l_part[ROWS], acc[ROWS];  // m_run is the same in every thread; l_part sums this thread's keys
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    m_run[r] = NEG_INF;
    l_part[r] = 0.f;
    acc[r] = 0.f;
  }
  const int d_col = tid % D, d_part = tid / D;  // O[r][d_col] over this partition's keys of each tile
  for (int t = t_begin; t < t_end; ++t) {
    const int stage = (t - t_begin) % STAGES;
    const int next = t + STAGES - 1;
    if (next < t_end) load(next, (next - t_begin) % STAGES);
    else cp_async_commit();
    cp_async_wait<STAGES - 1>();
    __syncthreads();
    const int key = t * BN + tid;
    float s[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) s[r] = 0.f;
    const u16* k_row = k_tiles + (stage * BN + tid) * LD;
#pragma unroll 4
    for (int c = 0; c < D; c += 8) {
      float kf[8];
      unpack8(lds128(smem_addr(k_row + c)), kf);
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        const float4 qa = *(const float4*)(q_rows + r * D + c), qb = *(const float4*)(q_rows + r * D + c + 4);
        s[r] += qa.x * kf[0] + qa.y * kf[1] + qa.z * kf[2] + qa.w * kf[3] + qb.x * kf[4] + qb.y * kf[5] + qb.z * kf[6] + qb.w * kf[7];
      }
    }
    bool key_kept = key < kend;
#if KEYMASK
    key_kept = key_kept && mask_tiles[stage * BN + tid] != 0;
#endif
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      const int query = q0 + r / GQA;
      bool kept = key_kept && query < SQ;
#if CAUSAL
      kept = kept && key <= query + kend - SQ;
#endif
      s[r] = kept ? s[r] : NEG_INF;
      const float tile_max = warp_max(s[r]);
      if (lane == 0) warp_red[r * 4 + warp] = tile_max;
    }
    __syncthreads();
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      const float tile_max = fmaxf(fmaxf(warp_red[r * 4], warp_red[r * 4 + 1]), fmaxf(warp_red[r * 4 + 2], warp_red[r * 4 + 3]));
      const float m_new = fmaxf(m_run[r], tile_max);
      const float alpha = m_new == NEG_INF ? 1.f : ex2(m_run[r] - m_new);
      const float p = m_new == NEG_INF ? 0.f : ex2(s[r] - m_new);
      l_part[r] = l_part[r] * alpha + p;
      acc[r] *= alpha;
      m_run[r] = m_new;
      p_rows[r * BN + tid] = p;
    }
    __syncthreads();
    const u16* v_col = v_tiles + stage * BN * LD + d_col;
#pragma unroll 8
    for (int j = d_part * (BN / DP); j < (d_part + 1) * (BN / DP); ++j) {
      const float vf = from_16(v_col[j * LD]);
#pragma unroll
      for (int r = 0; r < ROWS; ++r) acc[r] += p_rows[r * BN + j] * vf;
    }
    __syncthreads();  // the stage and p_rows are written again next tile
  }
  cp_async_wait<0>();

  // this CTA's partial result
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    const float l = warp_sum(l_part[r]);
    if (lane == 0) warp_red[r * 4 + warp] = l;
    if (tid == 0) part_m[r] = m_run[r];
    if (d_part == 0) part_o[r * D + d_col] = acc[r];
  }
  __syncthreads();
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    if (tid == 0) part_l[r] = warp_red[r * 4] + warp_red[r * 4 + 1] + warp_red[r * 4 + 2] + warp_red[r * 4 + 3];
    if (DP > 1 && d_part == 1) part_o[r * D + d_col] += acc[r];
  }
  cluster_sync();
  // each CTA merges a slice of the output from every CTA of the cluster
  for (int i = rank * THREADS + tid; i < ROWS * D; i += THREADS * CLUSTER) {
    const int r = i / D, d = i % D, query = q0 + r / GQA, h = kvh * GQA + r % GQA;
    float m[CLUSTER], row_max = NEG_INF;
#pragma unroll
    for (int c = 0; c < CLUSTER; ++c) {
      m[c] = ld_cluster(part_m + r, c);
      row_max = fmaxf(row_max, m[c]);
    }
    float l = 0.f, o = 0.f;
#pragma unroll
    for (int c = 0; c < CLUSTER; ++c) {
      const float w = m[c] == NEG_INF ? 0.f : ex2(m[c] - row_max);
      l += ld_cluster(part_l + r, c) * w;
      o += ld_cluster(part_o + i, c) * w;
    }
    if (query < SQ) {
      const long long row = (long long)(b * HQ + h) * SQ + query;
      O[row * D + d] = to_out(l > 0.f ? o / l : 0.f);
      if (d == 0) LSE[row] = l > 0.f ? (row_max + log2f(l)) * LN2 : NEG_INF;
    }
  }
  cluster_sync();  // no CTA leaves while another still reads its shared memory
}
"""


def _float_literal(x: float) -> str:
    """A float32 constant written exactly (its bit pattern), so the PTX does not depend on decimal printing."""
    bits = struct.unpack("<I", struct.pack("<f", x))[0]
    return f"__int_as_float(0x{bits:08X})"


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
    if dtype not in ("float16", "bfloat16"):
        raise ValueError(f"FlashAttention decode kernel: dtype must be float16/bfloat16, got {dtype}")
    if num_heads <= 0 or kv_num_heads <= 0 or num_heads % kv_num_heads:
        raise ValueError(f"FlashAttention decode kernel: num_heads {num_heads} must be a multiple of kv_num_heads "
                         f"{kv_num_heads}")
    if has_seqlens_k and has_key_mask:
        raise ValueError("FlashAttention decode kernel: seqlens_k and key_mask exclude each other")
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
            "@SCALE_LOG2@": _float_literal(scale * math.log2(math.e))}
    return name, fill(_SOURCE, subs)
