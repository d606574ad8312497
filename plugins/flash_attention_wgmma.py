"""Flash attention forward for Hopper, hand-written in CUDA C++ with ``wgmma``: the FA3 loop order.

Why not Triton: the Triton kernel (flash_attention.py) reaches 430-460 TFLOP/s at head dim 128 on an
H100, 0.70-0.81x of cuDNN, because each key block runs QK^T, softmax and PV one after the other in
every warp, so the tensor cores idle while the exponentials run (about half the MMA time at d128).
This kernel is FlashAttention-3's design with cp.async in place of TMA (a tensor map is a kernel
parameter TensorRT's AOT launch cannot pass):

* a producer warpgroup (40 registers after ``setmaxnreg``) loads K and V blocks into a ring of STAGES
  shared-memory stages, in the order the consumers need them (K_j, then V_{j-1}); per stage, mbarriers say
  "K landed" and "V landed" (``cp.async.mbarrier.arrive``) and "K free" / "V free" again (one arrival per
  consumer warp). K is released as soon as ``S_j`` is done, a block before its V, so the K loads run further
  ahead;
* WG consumer warpgroups (232 registers each with two) own 64 query rows each. For key block j a
  consumer issues ``S_j = Q K_j^T`` and the previous block's ``O += P_{j-1} V_{j-1}`` back to back,
  waits only for ``S_j``, and computes block j's softmax while ``P_{j-1} V_{j-1}`` still runs; then it
  waits for that, rescales O and packs ``P_j``;
* the consumers take turns to issue their MMAs (named barriers), so one's softmax runs under the other's
  MMAs.

K and V tiles are stored as D / 64 column blocks of 128-byte swizzled rows, the layout both wgmma
operands read: Q and K as K-major operands of ``S = Q K^T``, V as the MN-major (transposed) B operand
of ``O = P V``. P never leaves registers: the S accumulator fragment is the A register fragment of the
PV product. Rows past the sequence (or past ``seqlens_k``) are zero-filled, so padding never reaches
the product. The output goes out through the consumer's own Q rows in shared memory.

With a ``key_mask`` each CTA first scans its batch row of the mask: one run of kept keys (left or right
padding) is attended as a key range, the blocks before it never loaded; a mask with holes is read in the
softmax of every block.

Semantics are flash_attention.py's (ops.FLASH_ATTENTION): dense, padded (``seqlens_k``) or key-masked batches of
contiguous [B, H, S, D] tensors, GQA/MQA, bottom-right aligned causal mask, O and the natural-log LSE
(O = 0, LSE = -inf for a row that sees no key). Head dims 64 and 128, fp16/bf16, a positive scale.
Needs sm_90a. This module never imports Triton or graph code.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from .cuda_source import check_attention_arguments, consumer_registers, fill, float_literal

__all__ = ["AttnWgmmaConfig", "ATTN_WGMMA_TACTICS", "supports", "kernel_source", "kernel_name", "PTX_ISA", "ARCH"]

logger = logging.getLogger(__name__)

PTX_ISA = "8.0"  # wgmma and fence.proxy.async
ARCH = "compute_90a"
PROGRAMMATIC_LAUNCH = False  # reads its inputs without griddepcontrol.wait: plain launches only
_SMEM_LIMIT = 227 * 1024


@dataclass(frozen=True)
class AttnWgmmaConfig:
    """One tactic of the wgmma attention kernel for one head dim.

    Attributes:
        D: head dim (64 or 128).
        WG: consumer warpgroups per CTA, 64 query rows each (one more warpgroup loads K and V).
        BN: keys per block (wgmma's N of QK^T and its K of PV): 64, 128, 176 (FA3's d128 tile) or 192.
        STAGES: (K, V) stages in shared memory: the producer runs up to STAGES blocks ahead.
    """

    D: int
    WG: int
    BN: int
    STAGES: int = 2

    def __post_init__(self):
        if self.D not in (64, 128) or self.WG not in (1, 2, 3) or self.BN not in (64, 128, 176, 192) or self.STAGES < 2:
            raise ValueError(f"AttnWgmmaConfig: D in (64, 128), WG in (1, 2, 3), BN in (64, 128, 176, 192), STAGES >= 2; "
                             f"got {self}")
        if self.dynamic_shared_bytes > _SMEM_LIMIT:
            raise ValueError(f"AttnWgmmaConfig: {self} needs {self.dynamic_shared_bytes} B of shared memory (> 227 KiB)")

    @property
    def BLOCK_M(self) -> int:
        """Query rows per CTA (grid x = cdiv(Sq, BLOCK_M))."""
        return 64 * self.WG

    @property
    def num_warps(self) -> int:
        return 4 * (self.WG + 1)

    @property
    def consumer_registers(self) -> int:
        """Registers per consumer thread after ``setmaxnreg`` (the producer keeps 40): the CTA's launch allocation
        (65536 / threads, in steps of 8) redistributed."""
        return consumer_registers(32 * self.num_warps, self.WG)

    @property
    def dynamic_shared_bytes(self) -> int:
        q_tile = self.BLOCK_M * self.D * 2  # also the output tile
        stages = self.STAGES * 2 * self.BN * self.D * 2
        barriers = 4 * self.STAGES * 8
        # +1024: the window is aligned up to the 128-byte swizzle's 1024-byte atom in the kernel.
        return q_tile + stages + barriers + 1024

    def describe(self) -> str:
        return f"wgmma {self.BLOCK_M}x{self.BN} d{self.D} s{self.STAGES}"


# Measured on an H100 (benchmarks/gpu_notes.md, session 9). Once the producer's copies were one instruction each and
# K was released a block before V, 2 and 3 stages came within 7% of each other at d128, each ahead somewhere (the
# producer had been starving the consumers of issue slots, not of data); 3 stages is kept for the autotuner. 3 consumer warpgroups (192 rows)
# spill at 152 registers. wgmma_d64 is offered to the autotuner; the torch wrapper picks the Triton kernel at d64.
ATTN_WGMMA_TACTICS: dict[str, AttnWgmmaConfig] = {
    "wgmma_d128": AttnWgmmaConfig(128, 2, 128, 2),
    "wgmma_d128_s3": AttnWgmmaConfig(128, 2, 128, 3),
    "wgmma_d64": AttnWgmmaConfig(64, 2, 128, 4),
}


def supports(cfg: AttnWgmmaConfig, head_dim: int, scale: float) -> bool:
    """Whether a tactic takes this attention (``scale`` 0 means 1/sqrt(D); the row max needs scale > 0)."""
    return head_dim == cfg.D and scale >= 0.0


def kernel_name(cfg: AttnWgmmaConfig, dtype: str, num_heads: int, kv_num_heads: int, causal: bool,
                has_seqlens_k: bool, has_key_mask: bool = False) -> str:
    return (f"qc_attn_wgmma_{'bf16' if dtype == 'bfloat16' else 'f16'}_d{cfg.D}_m{cfg.BLOCK_M}_n{cfg.BN}"
            f"_s{cfg.STAGES}_h{num_heads}_kv{kv_num_heads}{'_causal' if causal else ''}{'_padded' if has_seqlens_k else ''}"
            f"{'_keymask' if has_key_mask else ''}")


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
#define KEYMASK @KEYMASK@
#define HQ @HQ@
#define GQA @GQA@
#define SCALE_LOG2 @SCALE_LOG2@  // softmax scale * log2(e): the exponentials are exp2
#define CWG WG                // consumer warpgroups, 64 query rows each; warpgroup 0 is the producer
#define BM (64 * CWG)
#define THREADS (128 * (CWG + 1))
#define REGS_PRODUCER 40
#define REGS_CONSUMER @REGS_CONSUMER@
#define Q_BYTES (BM * D * 2)
#define TILE_BYTES (BN * D * 2)
#define STAGE_BYTES (2 * TILE_BYTES)
#define NEG_INF __int_as_float(0xff800000)

@HALF2_HELPERS@

@WGMMA_HELPERS@

@PIPELINE_HELPERS@

@SOFTMAX_HELPERS@

// S (+)= Q . K^T for one 64-row slice: desc_a / desc_b advance 32 B per k16 inside a 64-wide column block.
__device__ __forceinline__ void wgmma_qk(float* acc, u64 desc_a, u64 desc_b, int scale_d) {
@WGMMA_QK@
}

// O += P . V: P is the k16 step's register fragment, V MN-major.
__device__ __forceinline__ void wgmma_pv(float* acc, const u32* a, u64 desc_b) {
@WGMMA_PV@
}

// Byte offset of 16-byte chunk c of row r in a tile of D / 64 column blocks, BLOCK bytes apart, of 128-byte
// swizzled rows (chunk c of a row sits at c ^ (row % 8)).
template <int BLOCK>
__device__ __forceinline__ u32 chunk_offset(int r, int c) {
  return (c >> 3) * BLOCK + r * 128 + (((c & 7) ^ (r & 7)) << 4);
}

// R rows starting at src (row stride D) by NT threads into column blocks BLOCK bytes apart; rows >= valid are
// zero-filled (no global read). A thread always copies the same chunk column of rows NT / (D / 8) apart, a multiple
// of 8, so its swizzle never changes and every copy is one base address plus a constant: the producer warpgroup
// shares its issue slots with the consumers, and per-copy index arithmetic measured as costly as the softmax.
template <int R, int NT, int BLOCK = R * 128>
__device__ __forceinline__ void load_tile(u32 dst, const u16* __restrict__ src, int valid, int tid) {
  constexpr int STEP = NT / (D / 8);  // rows between a thread's copies
  static_assert(STEP % 8 == 0 && R % STEP == 0, "load_tile: the swizzle must repeat every STEP rows");
  const int r0 = tid / (D / 8), c = tid % (D / 8);
  const u32 d0 = dst + chunk_offset<BLOCK>(r0, c);
  const u16* const s0 = src + r0 * D + 8 * c;
  if (valid >= R) {
#pragma unroll
    for (int i = 0; i < R / STEP; ++i) cp_async16(d0 + i * STEP * 128, s0 + i * STEP * D, true);
  } else {  // the last block only: kept rolled, unrolled it spills the producer's 40 registers
#pragma unroll 1
    for (int i = 0; i < R / STEP; ++i) {
      const bool ok = r0 + i * STEP < valid;
      cp_async16(d0 + i * STEP * 128, ok ? s0 + i * STEP * D : src, ok);
    }
  }
}

// Online softmax of one block for the lane's two rows (g and g + 8 of its warp's 16): s becomes P (unnormalised,
// exp2 domain), m the running max, l the lane's partial row sum; returns the two rescale factors of O.
template <bool MASK>
__device__ __forceinline__ void softmax(float (&s)[BN / 2], float (&m)[2], float (&l)[2], float (&alpha)[2],
                                        int key0, int row0, int k_lo, int k_len, const int* __restrict__ kept,
                                        int causal_off, int t) {
  float mx[2] = {NEG_INF, NEG_INF};
#pragma unroll
  for (int i = 0; i < BN / 8; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      if (MASK) {
        const int key = key0 + 8 * i + 2 * t + (e & 1);
        bool keep = key < k_len && key >= k_lo;
#if KEYMASK
        if (kept != nullptr) keep = keep && kept[key] != 0;
#endif
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

// Named barriers: 0 is __syncthreads; 1 + w is consumer warpgroup w's turn to issue MMAs; 1 + CWG + w its own
// epilogue barrier.
#define TURN_BAR(w) (1 + (w))
#define WG_BAR(w) (1 + CWG + (w))

extern "C" __global__ void __launch_bounds__(THREADS, 1) @NAME@(
    const u16* __restrict__ Q, const u16* __restrict__ K, const u16* __restrict__ V,
#if PADDED
    const int* __restrict__ SEQLENS_K,
#endif
#if KEYMASK
    const int* __restrict__ KEY_MASK,
#endif
    int SQ, int SK, u16* __restrict__ O, float* __restrict__ LSE) {
  extern __shared__ u8 smem_raw[];
  const u32 raw = smem_addr(smem_raw);
  const u32 base = (raw + 1023u) & ~1023u;
  u8* const smem = smem_raw + (base - raw);
  // mbarriers after the tiles: per stage "K landed", "V landed" (producer threads, cp.async) and "K free", "V free"
  // (one arrival per consumer warp).
  const u32 bars = base + Q_BYTES + STAGES * STAGE_BYTES;
  auto full_k = [&](int st) { return bars + 8 * st; };
  auto full_v = [&](int st) { return bars + 8 * (STAGES + st); };
  auto empty_k = [&](int st) { return bars + 8 * (2 * STAGES + st); };
  auto empty_v = [&](int st) { return bars + 8 * (3 * STAGES + st); };

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  // Longest causal rows first: block 0 takes the last query rows, so the grid's tail is short work.
  const int pid_m = CAUSAL ? gridDim.x - 1 - blockIdx.x : blockIdx.x;
  const int bh = blockIdx.y, b = bh / HQ, kvh = (bh % HQ) / GQA;
#if KEYMASK
  // The batch row of the key mask, scanned once: where its kept keys form one run (left or right padding, none),
  // the keys [k_lo, k_len) are attended like a dense row's, the blocks before k_lo skipped; otherwise (holes)
  // every block reads the mask.
  __shared__ int kept_range[3];
  if (tid == 0) {
    kept_range[0] = SK;
    kept_range[1] = -1;
    kept_range[2] = 0;
  }
  __syncthreads();
  const int* const km_row = KEY_MASK + (long long)b * SK;
  int first = SK, last = -1, count = 0;
#pragma unroll 4
  for (int key = tid; key < SK; key += THREADS)
    if (km_row[key] != 0) {
      first = min(first, key);
      last = key;
      ++count;
    }
#pragma unroll
  for (int o = 16; o; o >>= 1) {
    first = min(first, __shfl_xor_sync(0xffffffffu, first, o));
    last = max(last, __shfl_xor_sync(0xffffffffu, last, o));
    count += __shfl_xor_sync(0xffffffffu, count, o);
  }
  if (lane == 0) {
    atomicMin(&kept_range[0], first);
    atomicMax(&kept_range[1], last);
    atomicAdd(&kept_range[2], count);
  }
  __syncthreads();
  first = kept_range[0];
  last = kept_range[1];
  count = kept_range[2];
  const bool holes = count > 0 && count != last - first + 1;
  const int k_lo = holes || count == 0 ? 0 : first;
  const int k_len = holes ? SK : last + 1;
  const int* const kept = holes ? km_row : nullptr;
  const int causal_off = SK - SQ;
#else
#if PADDED
  const int k_len = max(min(SEQLENS_K[b], SK), 0);
#else
  const int k_len = SK;
#endif
  const int k_lo = 0;
  const bool holes = false;
  const int* const kept = nullptr;
  const int causal_off = k_len - SQ;
#endif
  const int m0 = pid_m * BM;
#if CAUSAL
  const int hi = max(min(k_len, m0 + BM + causal_off), 0);
  const int full_keys = min(max(m0 + causal_off + 1, 0), k_len);  // keys every row of the block sees
#else
  const int hi = k_len;
  const int full_keys = k_len;
#endif
  const int j0 = k_lo / BN;  // the first key block attended
  const int n_blocks = max((hi + BN - 1) / BN - j0, 0);
  const int n_full = full_keys / BN;  // blocks before it need no mask (but a block cut by k_lo, or any with holes)
  const u32 q_smem = base;
  auto stage_addr = [&](const Slot& sl) { return base + Q_BYTES + (u32)sl.stage * STAGE_BYTES; };

  if (tid == 0) {
    for (int st = 0; st < STAGES; ++st) {
      mbar_init(full_k(st), 128);
      mbar_init(full_v(st), 128);
      mbar_init(empty_k(st), 4 * CWG);
      mbar_init(empty_v(st), 4 * CWG);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();

  if (warp < 4) {  // producer warpgroup: K and V tiles, STAGES ahead of the consumers
#if CWG > 1
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" :: "n"(REGS_PRODUCER));
#endif
    const u16* const k_head = K + ((long long)b * (HQ / GQA) + kvh) * SK * D;
    const u16* const v_head = V + ((long long)b * (HQ / GQA) + kvh) * SK * D;
    // The consumers' order: block j's S needs K_j while the previous block's PV needs V_{j-1}.
    Slot sl, prev;
#pragma unroll 1
    for (int j = 0; j <= n_blocks; ++j) {
      if (j < n_blocks) {
        if (j >= STAGES) mbar_wait(empty_k(sl.stage), sl.phase ^ 1);  // its previous use was released
        load_tile<BN, 128>(stage_addr(sl), k_head + (long long)(j + j0) * BN * D, k_len - (j + j0) * BN, tid);
        cp_async_arrive(full_k(sl.stage));
      }
      if (j > 0) {
        if (j > STAGES) mbar_wait(empty_v(prev.stage), prev.phase ^ 1);
        load_tile<BN, 128>(stage_addr(prev) + TILE_BYTES, v_head + (long long)(j - 1 + j0) * BN * D,
                           k_len - (j - 1 + j0) * BN, tid);
        cp_async_arrive(full_v(prev.stage));
      }
      prev = sl;
      sl.next();
    }
    asm volatile("cp.async.wait_all;" ::: "memory");  // the last arrivals must fire before this thread exits
    return;
  }
#if CWG > 1
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" :: "n"(REGS_CONSUMER));
#endif
  const int wg = warp / 4 - 1, ctid = tid - 128 * (wg + 1);  // consumer warpgroup and its thread
  const int g = lane >> 2, t = lane & 3;
  const int row0 = m0 + 64 * wg + 16 * (warp & 3) + g;  // the lane's rows: row0 and row0 + 8
  // Each consumer warpgroup loads its own 64 Q rows (8 swizzle atoms per 64-wide column block).
  const u32 q_wg = q_smem + wg * 8192;
  const int q_row = m0 + 64 * wg;
  load_tile<64, 128, BM * 128>(q_wg, Q + ((long long)bh * SQ + q_row) * D, SQ - q_row, ctid);
  cp_async_commit();
  cp_async_wait<0>();
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
  named_sync(WG_BAR(wg), 128);

  const u64 q_desc = make_desc(q_wg);
  float o[D / 2], s[BN / 2];
  u32 p[BN / 4];
#pragma unroll
  for (int i = 0; i < D / 2; ++i) o[i] = 0.f;
  float m[2] = {-1.0e30f, -1.0e30f}, l[2] = {0.f, 0.f}, alpha[2];

  auto qk = [&](const Slot& sl) {
    const u32 kst = stage_addr(sl);
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk)
      wgmma_qk(s, q_desc + (kk >> 2) * (BM * 128 / 16) + 2 * (kk & 3),
               make_desc(kst) + (kk >> 2) * (BN * 128 / 16) + 2 * (kk & 3), kk);
  };
  auto pv = [&](const Slot& sl) {
    const u64 v_desc = make_desc_mn(stage_addr(sl) + TILE_BYTES, BN * 128);
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) wgmma_pv(o, &p[4 * kk], v_desc + kk * (2048 / 16));
  };
  auto ready = [&](u32 bar, const Slot& sl) {
    mbar_wait(bar, sl.phase);
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // cp.async (generic) writes -> wgmma reads
  };
  auto do_softmax = [&](int j) {
    const int key0 = (j + j0) * BN;
    if (holes || j + j0 >= n_full || key0 < k_lo)
      softmax<true>(s, m, l, alpha, key0, row0, k_lo, k_len, kept, causal_off, t);
    else
      softmax<false>(s, m, l, alpha, key0, row0, k_lo, k_len, kept, causal_off, t);
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
  auto release = [&](u32 bar) {
    if (lane == 0) mbar_arrive(bar);
  };
  // Ping-pong: the consumer warpgroups take turns to issue their MMAs, so one's softmax runs under the other's
  // MMAs. Warpgroup w waits for its turn and hands it to w + 1; the last one opens the first turn, and skips its
  // last hand-over, so that every arrival on a turn barrier is matched by a wait.
  const int n_issue = n_blocks + 1;
  auto take_turn = [&]() {
#if CWG > 1
    named_sync(TURN_BAR(wg), 256);
#endif
  };
  auto pass_turn = [&](int issue) {
#if CWG > 1
    if (wg != CWG - 1 || issue + 1 < n_issue) named_arrive(TURN_BAR((wg + 1) % CWG), 256);
#endif
  };

  if (n_blocks > 0) {
#if CWG > 1
    if (wg == CWG - 1) named_arrive(TURN_BAR(0), 256);
#endif
    Slot cur, prev;  // tiles j and j - 1
    ready(full_k(cur.stage), cur);
    take_turn();
    wgmma_fence();
    qk(cur);
    wgmma_commit();
    pass_turn(0);
    wgmma_wait<0>();
    release(empty_k(cur.stage));
    do_softmax(0);
    pack_p();
#pragma unroll 1
    for (int j = 1; j < n_blocks; ++j) {
      prev = cur;
      cur.next();
      ready(full_k(cur.stage), cur);
      ready(full_v(prev.stage), prev);
      take_turn();
      wgmma_fence();
      qk(cur);
      wgmma_commit();
      pv(prev);
      wgmma_commit();
      pass_turn(j);
      wgmma_wait<1>();  // S_j is ready; P_{j-1} V_{j-1} still runs under the softmax
      release(empty_k(cur.stage));
      do_softmax(j);
      wgmma_wait<0>();
      release(empty_v(prev.stage));
#pragma unroll
      for (int i = 0; i < D / 8; ++i) {
        o[4 * i + 0] *= alpha[0];
        o[4 * i + 1] *= alpha[0];
        o[4 * i + 2] *= alpha[1];
        o[4 * i + 3] *= alpha[1];
      }
      pack_p();
    }
    ready(full_v(cur.stage), cur);
    take_turn();
    wgmma_fence();
    pv(cur);
    wgmma_commit();
    pass_turn(n_blocks);
    wgmma_wait<0>();
  }

  // Epilogue through the warpgroup's own Q rows (no longer read): O in the same swizzled layout, which keeps
  // both the fragment writes and the 16-byte row reads free of bank conflicts.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float sum = quad_sum(l[r]);
    const bool empty_row = sum == 0.f;
    const float inv = empty_row ? 0.f : 1.f / sum;
    const int lr = 16 * (warp & 3) + g + 8 * r;  // row in the warpgroup's 64
#pragma unroll
    for (int i = 0; i < D / 8; ++i)
      *(u32*)(smem + (q_wg - base) + chunk_offset<BM * 128>(lr, i) + 4 * t) =
          pack2(o[4 * i + 2 * r] * inv, o[4 * i + 2 * r + 1] * inv);
    if (t == 0 && row0 + 8 * r < SQ)
      LSE[(long long)bh * SQ + row0 + 8 * r] = empty_row ? NEG_INF : (m[r] + __log2f(sum)) * 0.6931471805599453f;
  }
  named_sync(WG_BAR(wg), 128);
#pragma unroll
  for (int i = 0; i < D / 64 * 4; ++i) {
    const int idx = ctid + 128 * i, r = idx / (D / 8), c = idx % (D / 8);
    if (m0 + 64 * wg + r < SQ)
      *(v4*)(O + ((long long)bh * SQ + m0 + 64 * wg + r) * D + 8 * c) =
          *(const v4*)(smem + (q_wg - base) + chunk_offset<BM * 128>(r, c));
  }
}
"""


def kernel_source(cfg: AttnWgmmaConfig, dtype: str, num_heads: int, kv_num_heads: int, causal: bool, scale: float,
                  has_seqlens_k: bool, has_key_mask: bool = False) -> tuple[str, str]:
    """(entry name, CUDA C++ source) of one plugin configuration; heads, head dim and scale are compiled in.

    Parameters in launch order: Q, K, V, [seqlens_k | key_mask], SQ, SK, O, LSE (contiguous [B, H, S, D] tensors, LSE
    [B, Hq, SQ]). Dynamic shared memory: ``cfg.dynamic_shared_bytes``; grid (cdiv(SQ, BLOCK_M), B * Hq);
    block 128 * (WG + 1) threads.

    Raises:
        ValueError: a dtype other than float16/bfloat16, heads that do not divide, or a head dim / scale the
            tactic does not take.
    """
    check_attention_arguments("FlashAttention wgmma kernel", dtype, num_heads, kv_num_heads, has_seqlens_k, has_key_mask)
    if not supports(cfg, cfg.D, scale):
        raise ValueError(f"FlashAttention wgmma kernel {cfg.describe()}: needs a scale >= 0 (0: 1/sqrt(D)), got {scale}")
    scale = scale or 1.0 / math.sqrt(cfg.D)
    dt = "bf16" if dtype == "bfloat16" else "f16"
    name = kernel_name(cfg, dtype, num_heads, kv_num_heads, causal, has_seqlens_k, has_key_mask)
    subs = {"@NAME@": name, "@BF16@": str(int(dtype == "bfloat16")), "@D@": str(cfg.D), "@WG@": str(cfg.WG),
            "@BN@": str(cfg.BN), "@STAGES@": str(cfg.STAGES), "@CAUSAL@": str(int(causal)),
            "@PADDED@": str(int(has_seqlens_k)), "@KEYMASK@": str(int(has_key_mask)), "@HQ@": str(num_heads),
            "@GQA@": str(num_heads // kv_num_heads),
            "@SCALE_LOG2@": float_literal(scale * math.log2(math.e)),
            "@REGS_CONSUMER@": str(cfg.consumer_registers), "@WGMMA_QK@": _wgmma_ss(cfg.BN, dt), "@WGMMA_PV@": _wgmma_rs_transposed_b(cfg.D, dt)}
    return name, fill(_SOURCE, subs)
