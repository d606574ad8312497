"""What the hand-written CUDA C++ INT4 kernels (int4_gemm_mma.py, int4_gemm_wgmma.py) share: the 16-bit
pair arithmetic on packed registers, the MatMulNBits row geometry they compile in, and the template fill.

The helpers are written once for both element types: ``BF16`` (0/1) must be defined before
:data:`HALF2_HELPERS` is included; it defines ``MAGIC2``, the exponent of 1024.0 (fp16) or 128.0 (bf16) in
both halves, under which a 4-bit value OR-ed into the mantissa is exact. Never imports graph code.
"""

from __future__ import annotations

__all__ = ["HALF2_HELPERS", "weight_layout", "fill"]

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


def weight_layout(K: int, block_size: int) -> dict[str, str]:
    """Template values of the MatMulNBits geometry: packed bytes per (padded) row, groups per row, zero-point
    bytes per row."""
    n_blocks = -(-K // block_size)
    return {"@ROW_BYTES@": str(n_blocks * block_size // 2), "@NBLK@": str(n_blocks),
            "@ZSTRIDE@": str((n_blocks + 1) // 2)}


def fill(template: str, values: dict[str, str]) -> str:
    """Replaces each ``@KEY@`` of the template, and ``@HALF2_HELPERS@`` with :data:`HALF2_HELPERS`."""
    for key, value in {"@HALF2_HELPERS@": HALF2_HELPERS, **values}.items():
        template = template.replace(key, value)
    return template
