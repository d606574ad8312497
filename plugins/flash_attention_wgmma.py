"""Flash attention forward for Hopper, hand-written in CUDA C++ with ``wgmma``: the FA3 loop order.

Why not Triton: the Triton kernel (flash_attention.py) reaches 430-460 TFLOP/s at head dim 128 on an
H100, 0.70-0.81x of cuDNN, because each key block runs QK^T, softmax and PV one after the other in
every warp, so the tensor cores idle while the exponentials run (about half the MMA time at d128).
Here every warpgroup owns 64 query rows and, for key block j, issues ``S_j = Q K_j^T`` and the
previous block's ``O += P_{j-1} V_{j-1}`` back to back, waits only for ``S_j``, and computes the
softmax of block j while ``P_{j-1} V_{j-1}`` still runs; then it waits for that, rescales O and packs
``P_j``. (FlashAttention-3's intra-warpgroup overlap; its producer warp, TMA and ping-pong between
warpgroups are not done here.)

Shared memory holds Q (loaded once) and STAGES stages of (K_j, V_j), each a [rows, D] tile stored as
D / 64 column blocks of 128-byte swizzled rows, the layout both wgmma operands read: Q and K as
K-major operands of ``S = Q K^T``, V as the MN-major (transposed) B operand of ``O = P V``. P never
leaves registers: the S accumulator fragment is the A register fragment of the PV product. Loads are
16-byte cp.async by all threads, STAGES - 2 key blocks ahead; rows past the sequence (or past
``seqlens_k``) are zero-filled, so padding never reaches the product.

Semantics are flash_attention.py's (ops.FLASH_ATTENTION): dense or padded (``seqlens_k``) batches of
contiguous [B, H, S, D] tensors, GQA/MQA, bottom-right aligned causal mask, O and the natural-log LSE
(O = 0, LSE = -inf for a row that sees no key). Head dims 64 and 128, fp16/bf16, a positive scale.
Needs sm_90a. This module never imports Triton or graph code.
"""

from __future__ import annotations

import logging
import math
import struct
from dataclasses import dataclass

from .cuda_source import fill

__all__ = ["AttnWgmmaConfig", "ATTN_WGMMA_TACTICS", "supports", "kernel_source", "kernel_name", "PTX_ISA", "ARCH"]

logger = logging.getLogger(__name__)

PTX_ISA = "8.0"  # wgmma and fence.proxy.async
ARCH = "compute_90a"
_SMEM_LIMIT = 227 * 1024


@dataclass(frozen=True)
class AttnWgmmaConfig:
    """One tactic of the wgmma attention kernel for one head dim.

    Attributes:
        D: head dim (64 or 128).
        WG: warpgroups per CTA, 64 query rows each.
        BN: keys per block (wgmma's N of QK^T and its K of PV): 64, 128 or 192.
        STAGES: (K, V) stages in shared memory; STAGES - 2 blocks are loaded ahead (one is being multiplied,
            one holds the V of the PV product still in flight).
    """

    D: int
    WG: int
    BN: int
    STAGES: int = 3

    def __post_init__(self):
        if self.D not in (64, 128) or self.WG not in (1, 2, 3) or self.BN not in (64, 128, 192) or self.STAGES < 3:
            raise ValueError(f"AttnWgmmaConfig: D in (64, 128), WG in (1, 2, 3), BN in (64, 128, 192), STAGES >= 3; "
                             f"got {self}")
        if self.dynamic_shared_bytes > _SMEM_LIMIT:
            raise ValueError(f"AttnWgmmaConfig: {self} needs {self.dynamic_shared_bytes} B of shared memory (> 227 KiB)")

    @property
    def BLOCK_M(self) -> int:
        """Query rows per CTA (grid x = cdiv(Sq, BLOCK_M))."""
        return 64 * self.WG

    @property
    def num_warps(self) -> int:
        return 4 * self.WG

    @property
    def dynamic_shared_bytes(self) -> int:
        q_tile = self.BLOCK_M * self.D * 2
        stages = self.STAGES * 2 * self.BN * self.D * 2
        out_tile = self.BLOCK_M * (self.D + 8) * 2
        # +1024: the window is aligned up to the 128-byte swizzle's 1024-byte atom in the kernel.
        return max(q_tile + stages, out_tile) + 1024

    def describe(self) -> str:
        return f"wgmma {self.BLOCK_M}x{self.BN} d{self.D} s{self.STAGES}"


ATTN_WGMMA_TACTICS: dict[str, AttnWgmmaConfig] = {
    "wgmma_d128": AttnWgmmaConfig(128, 2, 128, 3),
    "wgmma_d128_n64": AttnWgmmaConfig(128, 2, 64, 4),
    "wgmma_d64": AttnWgmmaConfig(64, 2, 128, 4),
    "wgmma_d64_m192": AttnWgmmaConfig(64, 3, 128, 4),
}


def supports(cfg: AttnWgmmaConfig, head_dim: int, scale: float) -> bool:
    """Whether a tactic takes this attention (``scale`` 0 means 1/sqrt(D); the row max needs scale > 0)."""
    return head_dim == cfg.D and scale >= 0.0


def kernel_name(cfg: AttnWgmmaConfig, dtype: str, num_heads: int, kv_num_heads: int, causal: bool,
                has_seqlens_k: bool) -> str:
    return (f"qc_attn_wgmma_{'bf16' if dtype == 'bfloat16' else 'f16'}_d{cfg.D}_m{cfg.BLOCK_M}_n{cfg.BN}"
            f"_s{cfg.STAGES}_h{num_heads}_kv{kv_num_heads}{'_causal' if causal else ''}{'_padded' if has_seqlens_k else ''}")


def _wgmma_ss(n: int, dtype: str) -> str:
    """``acc[0:n/2] (+)= A . B`` with A and B K-major in shared memory; ``scale_d`` 0 overwrites."""
    n_acc = n // 2
    acc = ", ".join(f"%{i}" for i in range(n_acc))
    outs = ", ".join(f'"+f"(acc[{i}])' for i in range(n_acc))
    return (f'asm volatile("{{ .reg .pred p; setp.ne.b32 p, %{n_acc + 2}, 0; '
            f'wgmma.mma_async.sync.aligned.m64n{n}k16.f32.{dtype}.{dtype} '
            f'{{{acc}}}, %{n_acc}, %{n_acc + 1}, p, 1, 1, 0, 0; }}"\n'
            f'    : {outs}\n'
            f'    : "l"(desc_a), "l"(desc_b), "r"(scale_d));')


def _wgmma_rs_transposed_b(n: int, dtype: str) -> str:
    """``acc[0:n/2] += A . B`` with A in registers and B MN-major in shared memory."""
    n_acc = n // 2
    acc = ", ".join(f"%{i}" for i in range(n_acc))
    a = ", ".join(f"%{n_acc + i}" for i in range(4))
    outs = ", ".join(f'"+f"(acc[{i}])' for i in range(n_acc))
    return (f'asm volatile("wgmma.mma_async.sync.aligned.m64n{n}k16.f32.{dtype}.{dtype} '
            f'{{{acc}}}, {{{a}}}, %{n_acc + 4}, 1, 1, 1, 1;"\n'
            f'    : {outs}\n'
            f'    : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b));')


_SOURCE = r"""
#define BF16 @BF16@
#define D @D@
#define WG @WG@
#define BN @BN@
#define STAGES @STAGES@
#define CAUSAL @CAUSAL@
#define PADDED @PADDED@
#define HQ @HQ@
#define GQA @GQA@
#define SCALE_LOG2 @SCALE_LOG2@  // softmax scale * log2(e): the exponentials are exp2
#define BM (64 * WG)
#define THREADS (128 * WG)
#define PREFETCH (STAGES - 2)
#define Q_BYTES (BM * D * 2)
#define TILE_BYTES (BN * D * 2)
#define STAGE_BYTES (2 * TILE_BYTES)
#define NEG_INF __int_as_float(0xff800000)
#define OUT_STRIDE (D + 8)  // epilogue tile row (halves): +16 B keeps a quad's rows off one bank

@HALF2_HELPERS@

@WGMMA_HELPERS@

__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ u32 pack2(float lo, float hi) {
  u32 d;
#if BF16
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
#else
  asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
#endif
  return d;
}

__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}

__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// S (+)= Q . K^T for one 64-row slice: desc_a / desc_b advance 32 B per k16 inside a 64-wide column block.
__device__ __forceinline__ void wgmma_qk(float* acc, u64 desc_a, u64 desc_b, int scale_d) {
@WGMMA_QK@
}

// O += P . V: P is the k16 step's register fragment, V MN-major.
__device__ __forceinline__ void wgmma_pv(float* acc, const u32* a, u64 desc_b) {
@WGMMA_PV@
}

// A [R, D] tile of rows starting at src (row stride D) into D / 64 column blocks of R 128-byte swizzled rows;
// rows >= valid are zero-filled (no global read).
template <int R>
__device__ __forceinline__ void load_tile(u32 dst, const u16* __restrict__ src, int valid, int tid) {
#pragma unroll
  for (int i = 0; i < (R * D / 8 + THREADS - 1) / THREADS; ++i) {
    const int idx = tid + i * THREADS;
    if ((R * D / 8) % THREADS && idx >= R * D / 8) break;
    const int r = idx / (D / 8), c = idx % (D / 8);
    const bool ok = r < valid;
    cp_async16(dst + (c >> 3) * (R * 128) + r * 128 + (((c & 7) ^ (r & 7)) << 4), ok ? src + r * D + 8 * c : src, ok);
  }
}

// Online softmax of one block for the lane's two rows (g and g + 8 of its warp's 16): s becomes P (unnormalised,
// exp2 domain), m the running max, l the lane's partial row sum; returns the two rescale factors of O.
template <bool MASK>
__device__ __forceinline__ void softmax(float (&s)[BN / 2], float (&m)[2], float (&l)[2], float (&alpha)[2],
                                        int key0, int row0, int k_len, int causal_off, int t) {
  float mx[2] = {NEG_INF, NEG_INF};
#pragma unroll
  for (int i = 0; i < BN / 8; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      if (MASK) {
        const int key = key0 + 8 * i + 2 * t + (e & 1);
        bool keep = key < k_len;
#if CAUSAL
        keep = keep && key <= row0 + 8 * (e >> 1) + causal_off;
#endif
        if (!keep) s[4 * i + e] = NEG_INF;
      }
      mx[e >> 1] = fmaxf(mx[e >> 1], s[4 * i + e]);
    }
  float neg_m[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    // A finite floor (-1e30) instead of -inf keeps exp2(m_old - m_new) free of inf - inf on fully masked rows.
    const float m_new = fmaxf(m[r], quad_max(mx[r]) * SCALE_LOG2);
    alpha[r] = ex2(m[r] - m_new);
    m[r] = m_new;
    neg_m[r] = -m_new;
  }
  float sum[2] = {0.f, 0.f};
#pragma unroll
  for (int i = 0; i < BN / 8; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float p = ex2(fmaf(s[4 * i + e], SCALE_LOG2, neg_m[e >> 1]));
      s[4 * i + e] = p;
      sum[e >> 1] += p;
    }
  l[0] = l[0] * alpha[0] + sum[0];
  l[1] = l[1] * alpha[1] + sum[1];
}

extern "C" __global__ void __launch_bounds__(THREADS, 1) @NAME@(
    const u16* __restrict__ Q, const u16* __restrict__ K, const u16* __restrict__ V,
#if PADDED
    const int* __restrict__ SEQLENS_K,
#endif
    int SQ, int SK, u16* __restrict__ O, float* __restrict__ LSE) {
  extern __shared__ u8 smem_raw[];
  const u32 raw = smem_addr(smem_raw);
  const u32 base = (raw + 1023u) & ~1023u;
  u8* const smem = smem_raw + (base - raw);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, wg = warp >> 2;
  const int g = lane >> 2, t = lane & 3;
  // Longest causal rows first: block 0 takes the last query rows, so the grid's tail is short work.
  const int pid_m = CAUSAL ? gridDim.x - 1 - blockIdx.x : blockIdx.x;
  const int bh = blockIdx.y, b = bh / HQ, kvh = (bh % HQ) / GQA;
#if PADDED
  const int k_len = max(min(SEQLENS_K[b], SK), 0);
#else
  const int k_len = SK;
#endif
  const int m0 = pid_m * BM;
  const int causal_off = k_len - SQ;
#if CAUSAL
  const int hi = max(min(k_len, m0 + BM + causal_off), 0);
  const int full_keys = min(max(m0 + causal_off + 1, 0), k_len);  // keys every row of the block sees
#else
  const int hi = k_len;
  const int full_keys = k_len;
#endif
  const int n_blocks = (hi + BN - 1) / BN;
  const int n_full = full_keys / BN;  // blocks before it need no mask

  const u16* q_src = Q + ((long long)bh * SQ + m0) * D;
  const long long kv_off = ((long long)b * (HQ / GQA) + kvh) * SK * D;
  const u16* k_src = K + kv_off;
  const u16* v_src = V + kv_off;
  const u32 q_smem = base;
  auto stage_addr = [&](int j) { return base + Q_BYTES + (u32)(j % STAGES) * STAGE_BYTES; };
  auto load_stage = [&](int j) {
    if (j < n_blocks) {
      load_tile<BN>(stage_addr(j), k_src + (long long)j * BN * D, k_len - j * BN, tid);
      load_tile<BN>(stage_addr(j) + TILE_BYTES, v_src + (long long)j * BN * D, k_len - j * BN, tid);
    }
    cp_async_commit();
  };

  load_tile<BM>(q_smem, q_src, SQ - m0, tid);
#pragma unroll
  for (int j = 0; j < PREFETCH; ++j) load_stage(j);  // the Q tile rides in the first group

  const int row0 = m0 + 16 * warp + g;  // the lane's rows: row0 and row0 + 8 (warpgroup wg owns 64 wg..)
  // Q: the warpgroup's 64 rows are 8 swizzle atoms at 8 KiB per warpgroup inside each column block.
  const u64 q_desc = make_desc(q_smem + wg * 8192);
  float o[D / 2], s[BN / 2];
  u32 p[BN / 4];
#pragma unroll
  for (int i = 0; i < D / 2; ++i) o[i] = 0.f;
  float m[2] = {-1.0e30f, -1.0e30f}, l[2] = {0.f, 0.f}, alpha[2];

  auto qk = [&](int j) {
    const u32 kst = stage_addr(j);
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk)
      wgmma_qk(s, q_desc + (kk >> 2) * (BM * 128 / 16) + 2 * (kk & 3),
               make_desc(kst) + (kk >> 2) * (BN * 128 / 16) + 2 * (kk & 3), kk);
  };
  auto pv = [&](int j) {
    const u64 v_desc = make_desc_mn(stage_addr(j) + TILE_BYTES, BN * 128);
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) wgmma_pv(o, &p[4 * kk], v_desc + kk * (2048 / 16));
  };
  auto wait_stage = [&](int j) {
    cp_async_wait<PREFETCH - 1>();
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    __syncthreads();  // stage j is visible to all; every warpgroup is past block j - 1, so stage j - 2 is free
    load_stage(j + PREFETCH);
  };
  auto do_softmax = [&](int j) {
    if (j >= n_full)
      softmax<true>(s, m, l, alpha, j * BN, row0, k_len, causal_off, t);
    else
      softmax<false>(s, m, l, alpha, j * BN, row0, k_len, causal_off, t);
  };
  // s -> the A fragments of P: k16 step kk takes (row g, keys 2t..), (g + 8, 2t..), (g, 2t + 8..), (g + 8, 2t + 8..).
  auto pack_p = [&]() {
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      p[4 * kk + 0] = pack2(s[8 * kk + 0], s[8 * kk + 1]);
      p[4 * kk + 1] = pack2(s[8 * kk + 2], s[8 * kk + 3]);
      p[4 * kk + 2] = pack2(s[8 * kk + 4], s[8 * kk + 5]);
      p[4 * kk + 3] = pack2(s[8 * kk + 6], s[8 * kk + 7]);
    }
  };

  if (n_blocks > 0) {
    wait_stage(0);
    wgmma_fence();
    qk(0);
    wgmma_commit();
    wgmma_wait<0>();
    do_softmax(0);
    pack_p();
#pragma unroll 1
    for (int j = 1; j < n_blocks; ++j) {
      wait_stage(j);
      wgmma_fence();
      qk(j);
      wgmma_commit();
      pv(j - 1);
      wgmma_commit();
      wgmma_wait<1>();  // S_j is ready; P_{j-1} V_{j-1} still runs under the softmax
      do_softmax(j);
      wgmma_wait<0>();
#pragma unroll
      for (int i = 0; i < D / 8; ++i) {
        o[4 * i + 0] *= alpha[0];
        o[4 * i + 1] *= alpha[0];
        o[4 * i + 2] *= alpha[1];
        o[4 * i + 3] *= alpha[1];
      }
      pack_p();
    }
    wgmma_fence();
    pv(n_blocks - 1);
    wgmma_commit();
    wgmma_wait<0>();
  }
  cp_async_wait<0>();
  __syncthreads();  // every warpgroup is done with shared memory: reuse it for the output tile

  u16* out = (u16*)smem;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float sum = quad_sum(l[r]);
    const bool empty = sum == 0.f;
    const float inv = empty ? 0.f : 1.f / sum;
    const int lr = 16 * warp + g + 8 * r;  // row in the CTA tile
#pragma unroll
    for (int i = 0; i < D / 8; ++i) {
      const u32 v = pack2(o[4 * i + 2 * r] * inv, o[4 * i + 2 * r + 1] * inv);
      *(u32*)(out + lr * OUT_STRIDE + 8 * i + 2 * t) = v;
    }
    if (t == 0 && m0 + lr < SQ)
      LSE[(long long)bh * SQ + m0 + lr] = empty ? NEG_INF : (m[r] + __log2f(sum)) * 0.6931471805599453f;
  }
  __syncthreads();
  for (int idx = tid; idx < BM * (D / 8); idx += THREADS) {
    const int r = idx / (D / 8), c = idx % (D / 8);
    if (m0 + r < SQ) *(v4*)(O + ((long long)bh * SQ + m0 + r) * D + 8 * c) = *(const v4*)(out + r * OUT_STRIDE + 8 * c);
  }
}
"""


def _float_literal(x: float) -> str:
    """A float32 constant written exactly (its bit pattern), so the PTX does not depend on decimal printing."""
    bits = struct.unpack("<I", struct.pack("<f", x))[0]
    return f"__int_as_float(0x{bits:08X})"


def kernel_source(cfg: AttnWgmmaConfig, dtype: str, num_heads: int, kv_num_heads: int, causal: bool, scale: float,
                  has_seqlens_k: bool) -> tuple[str, str]:
    """(entry name, CUDA C++ source) of one plugin configuration; heads, head dim and scale are compiled in.

    Parameters in launch order: Q, K, V, [seqlens_k], SQ, SK, O, LSE (contiguous [B, H, S, D] tensors, LSE
    [B, Hq, SQ]). Dynamic shared memory: ``cfg.dynamic_shared_bytes``; grid (cdiv(SQ, BLOCK_M), B * Hq);
    block 128 * WG threads.

    Raises:
        ValueError: a dtype other than float16/bfloat16, heads that do not divide, or a head dim / scale the
            tactic does not take.
    """
    if dtype not in ("float16", "bfloat16"):
        raise ValueError(f"FlashAttention wgmma kernel: dtype must be float16/bfloat16, got {dtype}")
    if num_heads <= 0 or kv_num_heads <= 0 or num_heads % kv_num_heads:
        raise ValueError(f"FlashAttention wgmma kernel: num_heads {num_heads} must be a multiple of kv_num_heads "
                         f"{kv_num_heads}")
    if not supports(cfg, cfg.D, scale):
        raise ValueError(f"FlashAttention wgmma kernel {cfg.describe()}: needs a scale >= 0 (0: 1/sqrt(D)), got {scale}")
    scale = scale or 1.0 / math.sqrt(cfg.D)
    dt = "bf16" if dtype == "bfloat16" else "f16"
    name = kernel_name(cfg, dtype, num_heads, kv_num_heads, causal, has_seqlens_k)
    subs = {"@NAME@": name, "@BF16@": str(int(dtype == "bfloat16")), "@D@": str(cfg.D), "@WG@": str(cfg.WG),
            "@BN@": str(cfg.BN), "@STAGES@": str(cfg.STAGES), "@CAUSAL@": str(int(causal)),
            "@PADDED@": str(int(has_seqlens_k)), "@HQ@": str(num_heads), "@GQA@": str(num_heads // kv_num_heads),
            "@SCALE_LOG2@": _float_literal(scale * math.log2(math.e)),
            "@WGMMA_QK@": _wgmma_ss(cfg.BN, dt), "@WGMMA_PV@": _wgmma_rs_transposed_b(cfg.D, dt)}
    return name, fill(_SOURCE, subs)
