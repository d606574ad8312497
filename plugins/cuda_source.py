"""What the hand-written CUDA C++ kernels share: the 16-bit pair arithmetic on packed registers (INT4 kernels),
the shared-memory / cp.async / wgmma plumbing (the sm_90a kernels), the MatMulNBits row geometry and the template
fill.

The helpers are written once for both element types: ``BF16`` (0/1) must be defined before
:data:`HALF2_HELPERS` is included; it defines ``MAGIC2``, the exponent of 1024.0 (fp16) or 128.0 (bf16) in
both halves, under which a 4-bit value OR-ed into the mantissa is exact. Never imports graph code.
"""

from __future__ import annotations

import struct

__all__ = ["HALF2_HELPERS", "WGMMA_HELPERS", "PIPELINE_HELPERS", "SOFTMAX_HELPERS", "consumer_registers", "weight_layout",
           "fill", "float_literal", "check_attention_arguments"]

HALF2_HELPERS = r"""
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;
typedef unsigned long long u64;
struct __align__(16) v4 { u32 a, b, c, d; };

#if BF16
#define MAGIC2 0x43004300u
#define DT "bf16"
#else
#define MAGIC2 0x64006400u
#define DT "f16"
#endif

__device__ __forceinline__ u32 prmt(u32 a, u32 b, u32 sel) {
  u32 d;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
  return d;
}

// (w & mask) | MAGIC2 as one LOP3: written as C, the compiler emits two (an SASS LOP3 takes one immediate).
#define LOP_MASK_MAGIC(d, w, mask) asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(w), "n"(mask), "n"(MAGIC2))
__device__ __forceinline__ u32 lop_mask_magic_lo(u32 w) { u32 d; LOP_MASK_MAGIC(d, w, 0x000F000Fu); return d; }
__device__ __forceinline__ u32 lop_mask_magic_hi(u32 w) { u32 d; LOP_MASK_MAGIC(d, w, 0x00F000F0u); return d; }

__device__ __forceinline__ u32 sub2(u32 a, u32 b) {
  u32 d;
#if BF16
  asm("sub.rn.bf16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
#else
  asm("sub.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
#endif
  return d;
}

__device__ __forceinline__ u32 mul2(u32 a, u32 b) {
  u32 d;
#if BF16
  asm("mul.rn.bf16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
#else
  asm("mul.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
#endif
  return d;
}

// (lo, hi) rounded into one register of two 16-bit values, lo in the low half.
__device__ __forceinline__ u32 pack2(float lo, float hi) {
  u32 d;
#if BF16
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
#else
  asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
#endif
  return d;
}

__device__ __forceinline__ u16 to_out(float v) {
  u16 h;
#if BF16
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(v));
#else
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
#endif
  return h;
}

__device__ __forceinline__ float from_16(u16 h) {
  float f;
#if BF16
  asm("mov.b32 %0, %1;" : "=f"(f) : "r"(((u32)h) << 16));
#else
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
#endif
  return f;
}
"""


# Shared memory, cp.async and wgmma plumbing of the sm_90a kernels (int4_gemm_wgmma.py, flash_attention_wgmma.py);
# needs HALF2_HELPERS' typedefs first.
WGMMA_HELPERS = r"""
__device__ __forceinline__ u32 smem_addr(const void* p) {
  return (u32)__cvta_generic_to_shared(p);
}

__device__ __forceinline__ void cp_async16(u32 dst, const void* src, bool ok) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" :: "r"(dst), "l"(src), "r"(ok ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" :: "n"(N)); }

__device__ __forceinline__ v4 lds128(u32 addr) {
  v4 r;
  asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(r.a), "=r"(r.b), "=r"(r.c), "=r"(r.d) : "r"(addr));
  return r;
}

// Shared-memory matrix descriptor of a K-major tile with the 128-byte swizzle (8-row atoms 1024 B apart).
__device__ __forceinline__ u64 make_desc(u32 addr) {
  return (u64)((addr & 0x3FFFF) >> 4) | ((u64)1 << 16) | ((u64)(1024 >> 4) << 32) | ((u64)1 << 62);
}

// The same for an MN-major tile (wgmma with the transpose flag): 64-element-wide column blocks of 128-byte
// swizzled rows, LBO bytes apart; groups of 8 K rows 1024 B apart.
__device__ __forceinline__ u64 make_desc_mn(u32 addr, u32 lbo) {
  return (u64)((addr & 0x3FFFF) >> 4) | ((u64)(lbo >> 4) << 16) | ((u64)(1024 >> 4) << 32) | ((u64)1 << 62);
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N> __device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" :: "n"(N) : "memory");
}
"""


# mbarrier / named-barrier plumbing and the ring position of the warp-specialised sm_90a kernels (a producer
# warpgroup fills STAGES shared-memory stages, consumers release them); needs WGMMA_HELPERS and STAGES first.
PIPELINE_HELPERS = r"""
__device__ __forceinline__ void mbar_init(u32 bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" :: "r"(bar), "r"(count));
}
__device__ __forceinline__ void mbar_wait(u32 bar, int parity) {
  asm volatile("{ .reg .pred done; WAIT_%=: mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1; "
               "@!done bra WAIT_%=; }" :: "r"(bar), "r"(parity) : "memory");
}
__device__ __forceinline__ void mbar_arrive(u32 bar) {
  asm volatile("{ .reg .b64 state; mbarrier.arrive.shared::cta.b64 state, [%0]; }" :: "r"(bar) : "memory");
}
// Arrives on the barrier once every cp.async this thread issued so far has landed (noinc: counted in the init).
__device__ __forceinline__ void cp_async_arrive(u32 bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];" :: "r"(bar) : "memory");
}
__device__ __forceinline__ void named_sync(int id, int count) { asm volatile("bar.sync %0, %1;" :: "r"(id), "r"(count) : "memory"); }
__device__ __forceinline__ void named_arrive(int id, int count) { asm volatile("bar.arrive %0, %1;" :: "r"(id), "r"(count) : "memory"); }

// A pipeline position: the stage a block uses and the parity of that stage's use (flips each time round).
struct Slot {
  int stage = 0, phase = 0;
  __device__ __forceinline__ void next() {
    if (++stage == STAGES) {
      stage = 0;
      phase ^= 1;
    }
  }
};
"""


# The online softmax of the attention kernels (flash_attention_wgmma.py, flash_decode.py): exp2, and the row max / sum
# over the 4 threads of an MMA fragment's quad.
SOFTMAX_HELPERS = r"""
__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}

__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}
"""


def consumer_registers(threads: int, consumer_warpgroups: int, producer_registers: int = 40) -> int:
    """Registers per consumer thread after ``setmaxnreg``: the CTA's launch allocation (65536 / threads, in steps of
    8, at most 255) less the producer warpgroup's, shared by the consumer warpgroups (at most 256)."""
    launch = min(255, 65536 // threads) // 8 * 8
    return min(256, (launch * threads - 128 * producer_registers) // (128 * consumer_warpgroups) // 8 * 8)


def weight_layout(K: int, block_size: int) -> dict[str, str]:
    """Template values of the MatMulNBits geometry: packed bytes per (padded) row, groups per row, zero-point
    bytes per row."""
    n_blocks = -(-K // block_size)
    return {"@ROW_BYTES@": str(n_blocks * block_size // 2), "@NBLK@": str(n_blocks),
            "@ZSTRIDE@": str((n_blocks + 1) // 2)}


def fill(template: str, values: dict[str, str]) -> str:
    """Replaces each ``@KEY@`` of the template, and ``@HALF2_HELPERS@`` / ``@WGMMA_HELPERS@`` /
    ``@PIPELINE_HELPERS@`` / ``@SOFTMAX_HELPERS@`` with the helpers."""
    helpers = {"@HALF2_HELPERS@": HALF2_HELPERS, "@WGMMA_HELPERS@": WGMMA_HELPERS, "@PIPELINE_HELPERS@": PIPELINE_HELPERS,
               "@SOFTMAX_HELPERS@": SOFTMAX_HELPERS}
    for key, value in {**helpers, **values}.items():
        template = template.replace(key, value)
    return template


def float_literal(x: float) -> str:
    """A float32 constant written exactly (its bit pattern), so the PTX does not depend on decimal printing."""
    bits = struct.unpack("<I", struct.pack("<f", x))[0]
    return f"__int_as_float(0x{bits:08X})"


def check_attention_arguments(kernel: str, dtype: str, num_heads: int, kv_num_heads: int, has_seqlens_k: bool,
                              has_key_mask: bool) -> None:
    """What every attention kernel's source needs of its configuration; raises ValueError naming ``kernel``."""
    if dtype not in ("float16", "bfloat16"):
        raise ValueError(f"{kernel}: dtype must be float16/bfloat16, got {dtype}")
    if num_heads <= 0 or kv_num_heads <= 0 or num_heads % kv_num_heads:
        raise ValueError(f"{kernel}: num_heads {num_heads} must be a multiple of kv_num_heads {kv_num_heads}")
    if has_seqlens_k and has_key_mask:
        raise ValueError(f"{kernel}: seqlens_k and key_mask exclude each other")
