"""Ahead-of-time compilation of the plugin kernels to PTX, with their exact launch parameters.

A *plugin configuration* fixes everything TensorRT knows when it builds an engine (dtypes, weight
shapes, which optional inputs exist, attributes, the tactic); only runtime dimensions (tokens M, batch
B, sequence lengths) stay symbolic. For each configuration :func:`build` returns an :class:`AotKernel`:
the PTX, the kernel's entry name, ``num_warps`` (block = 32 * num_warps threads), the dynamic shared
memory, the parameter list in launch order and the grid as expressions over the runtime symbols.

Calling convention (TensorRT's AOT plugins): tensor inputs in the op's input order, then scalar
arguments, then tensor outputs; absent optional inputs are compiled out (constexpr None). Triton 3.x
appends two pointer parameters (global and profile scratch) to every kernel; :func:`compile_kernel`
refuses kernels that need scratch, so those two are never read and launchers pass null.

Specialization is explicit and checked at launch: every pointer is assumed 16-byte aligned (TensorRT
and the torch allocator give 256), and an integer is marked divisible by 16 only when its value is a
compile-time constant of the configuration that is (never for a runtime symbol).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import Any

import triton
from triton.backends.compiler import GPUTarget

from .ops import FLASH_ATTENTION, INT4_GEMM, NORMS, QUANTIZE_PER_TOKEN, W8A8_GEMM

__all__ = ["AotKernel", "Expr", "Int4GemmPlugin", "W8A8GemmPlugin", "QuantizePerTokenPlugin",
           "FlashAttentionPlugin", "build", "build_attn_cuda", "build_int4_cuda", "cuda_tactics", "compile_kernel", "tactics", "TARGET"]

logger = logging.getLogger(__name__)

TARGET = GPUTarget("cuda", 90, 64)  # H100 / H200 (sm_90a PTX)
_DTYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}


@dataclass(frozen=True)
class Expr:
    """``const * prod(ceil(sym / div))`` over runtime symbols: enough for grids, counts and strides."""

    const: int = 1
    factors: tuple[tuple[str, int], ...] = ()

    def evaluate(self, env: dict[str, Any], cdiv=None):
        """Value for concrete ints, or for symbolic objects (TensorRT SymInt32) supporting + // *."""
        cdiv = cdiv or (lambda a, b: (a + b - 1) // b)
        value = self.const
        for sym, div in self.factors:
            term = env[sym] if div == 1 else cdiv(env[sym], div)
            value = term * value if isinstance(value, int) else value * term
        return value

    @staticmethod
    def of(x: int | str | Expr) -> Expr:
        if isinstance(x, Expr):
            return x
        return Expr(const=x) if isinstance(x, int) else Expr(1, ((x, 1),))


@dataclass(frozen=True)
class AotKernel:
    """One compiled kernel and how to launch it.

    Attributes:
        kernel_name: PTX entry name.
        ptx: PTX text (sm_90a).
        num_warps: block is (32 * num_warps, 1, 1).
        shared_mem: dynamic shared memory in bytes (set the kernel's max-dynamic-smem attribute when > 48 KiB).
        params: launch-ordered (name, kind, source): kind "in"/"out" with source the op's tensor name,
            or "i32" with source an :class:`Expr`; then ("scratch", "ptr", None) for Triton's trailing
            scratch pointers (always null).
        grid: three :class:`Expr`.
        programmatic: the kernel executes ``griddepcontrol.wait`` before its first memory access, so a launcher may
            give it programmatic stream serialization (PDL: it may start while the previous grid in the stream
            finishes). TensorRT's AOT plugin interface declares no launch attributes, so TensorRT launches it
            plainly; a runtime that launches the PTX itself may set it, as ``launch.launch(..., programmatic=True)``
            does.
    """

    kernel_name: str
    ptx: str
    num_warps: int
    shared_mem: int
    params: tuple[tuple[str, str, Any], ...]
    grid: tuple[Expr, Expr, Expr]
    programmatic: bool = False

    @property
    def block(self) -> tuple[int, int, int]:
        return (32 * self.num_warps, 1, 1)


def compile_kernel(fn, signature: dict[str, str], constexprs: dict[str, Any], *, num_warps: int, num_stages: int,
                   divisible: set[str]) -> Any:
    """triton.compile for sm_90 with explicit constexprs and divisibility hints; returns the CompiledKernel."""
    sig = {name: ("constexpr" if name in constexprs else signature[name]) for name in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if name not in constexprs and (sig[name].startswith("*") or name in divisible)}
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    kernel = triton.compile(src, target=TARGET, options={"num_warps": num_warps, "num_stages": num_stages})
    md = kernel.metadata
    if getattr(md, "global_scratch_size", 0) or getattr(md, "profile_scratch_size", 0):
        raise RuntimeError(f"{md.name}: kernels that need Triton scratch memory cannot be AOT plugins")
    return kernel


def ptx_param_count(ptx: str, name: str) -> int:
    m = re.search(r"\.entry\s+" + re.escape(name) + r"\s*\((.*?)\)", ptx, re.S)
    if not m:
        raise ValueError(f"entry {name} not found in PTX")
    return m.group(1).count(".param")


def _finish(kernel, fn, constexprs, params_by_name: dict[str, tuple[str, Any]], grid) -> AotKernel:
    params = [(n, *params_by_name[n]) for n in fn.arg_names if n not in constexprs]
    name = kernel.metadata.name
    extra = ptx_param_count(kernel.asm["ptx"], name) - len(params)
    if extra < 0:
        raise RuntimeError(f"{name}: PTX has fewer parameters than the signature")
    params += [("scratch", "ptr", None)] * extra
    return AotKernel(name, kernel.asm["ptx"], kernel.metadata.num_warps, kernel.metadata.shared, tuple(params),
                     tuple(Expr.of(g) for g in grid))


def _div16(**values: int) -> set[str]:
    return {k for k, v in values.items() if isinstance(v, int) and v % 16 == 0}


# ----------------------------------------------------------------------------------------------------------------
# Plugin configurations


@dataclass(frozen=True)
class Int4GemmPlugin:
    """qcompiler::Int4Gemm for one weight: runtime symbol M (tokens = product of X's leading dims)."""

    dtype: str  # activation / output: float16 | bfloat16
    N: int
    K: int
    block_size: int
    has_zero_points: bool = False
    has_bias: bool = False
    tactic: str = "m16"
    op_type: str = INT4_GEMM


@dataclass(frozen=True)
class W8A8GemmPlugin:
    """qcompiler::W8A8Gemm for one weight: runtime symbol M."""

    out_dtype: str  # float16 | bfloat16
    N: int
    K: int
    has_bias: bool = False
    tactic: str = "large"
    op_type: str = W8A8_GEMM


@dataclass(frozen=True)
class QuantizePerTokenPlugin:
    """qcompiler::QuantizePerToken over rows of H: runtime symbol M (rows)."""

    dtype: str
    H: int
    norm: str = "none"
    epsilon: float = 1e-6
    op_type: str = QUANTIZE_PER_TOKEN


@dataclass(frozen=True)
class FlashAttentionPlugin:
    """qcompiler::FlashAttention, dense, padded (seqlens_k) or key-masked (key_mask) [B, H, S, D]: runtime
    symbols B, SQ, SK."""

    dtype: str
    num_heads: int
    kv_num_heads: int
    head_dim: int
    causal: bool = False
    scale: float = 0.0
    has_seqlens_k: bool = False
    tactic: str = ""
    op_type: str = FLASH_ATTENTION
    has_key_mask: bool = False


def tactics(config) -> list[str]:
    """Tactic names a configuration can be built with (TensorRT times each and keeps the fastest)."""
    if isinstance(config, Int4GemmPlugin):
        from .int4_gemm import INT4_TACTICS
        return list(INT4_TACTICS) + [name for name, cfg in cuda_tactics().items()
                                     if _cuda_module(cfg).supports(cfg, config.N, config.K, config.block_size)]
    if isinstance(config, W8A8GemmPlugin):
        from .w8a8_gemm import W8A8_TACTICS
        return list(W8A8_TACTICS)
    if isinstance(config, FlashAttentionPlugin):
        from .flash_attention import ATTN_TACTICS
        from .flash_attention_wgmma import ATTN_WGMMA_TACTICS, supports
        from .flash_decode import ATTN_DECODE_TACTICS
        from .flash_decode import supports as supports_decode
        gqa = config.num_heads // config.kv_num_heads
        return (list(ATTN_TACTICS) + [name for name, cfg in ATTN_WGMMA_TACTICS.items() if supports(cfg, config.head_dim, config.scale)]
                + [name for name, cfg in ATTN_DECODE_TACTICS.items() if supports_decode(cfg, config.head_dim, config.scale, gqa)])
    return ["default"]


def build(config) -> AotKernel:
    """Compiles the kernel of a plugin configuration; returns PTX and launch parameters."""
    if isinstance(config, Int4GemmPlugin):
        return _build_int4(config)
    if isinstance(config, W8A8GemmPlugin):
        return _build_w8a8(config)
    if isinstance(config, QuantizePerTokenPlugin):
        return _build_quant(config)
    if isinstance(config, FlashAttentionPlugin):
        return _build_attn(config)
    raise TypeError(f"not a plugin configuration: {config!r}")


def _build_int4(c: Int4GemmPlugin) -> AotKernel:
    import torch

    from .int4_gemm import INT4_TACTICS, _int4_gemm_kernel, fit_int4_config, kernel_constexprs
    if c.dtype not in ("float16", "bfloat16"):
        raise ValueError(f"Int4Gemm plugin: dtype must be float16/bfloat16, got {c.dtype}")
    if c.tactic in cuda_tactics():
        return build_int4_cuda(c, cuda_tactics()[c.tactic])
    cfg = fit_int4_config(INT4_TACTICS[c.tactic], c.K, c.block_size)
    nb = -(-c.K // c.block_size)
    dt = _DTYPES[c.dtype]
    constexprs = kernel_constexprs(cfg, c.K, c.block_size, getattr(torch, c.dtype), c.has_zero_points, c.has_bias)
    if not c.has_zero_points:
        constexprs["ZP"] = None
    if not c.has_bias:
        constexprs["BIAS"] = None
    scalars = dict(M="M", N=c.N, K=c.K, stride_xm=c.K, stride_bn=nb * c.block_size // 2, stride_sn=nb,
                   stride_zn=(nb + 1) // 2, stride_ym=c.N)
    sig = dict(X=f"*{dt}", B="*u8", S=f"*{dt}", ZP="*u8", BIAS=f"*{dt}", Y=f"*{dt}", **{k: "i32" for k in scalars})
    kernel = compile_kernel(_int4_gemm_kernel, sig, constexprs, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                            divisible=_div16(**{k: v for k, v in scalars.items() if k != "M"}))
    params = {"X": ("in", "X"), "B": ("in", "B"), "S": ("in", "scales"), "ZP": ("in", "zero_points"),
              "BIAS": ("in", "bias"), "Y": ("out", "Y"), **{k: ("i32", Expr.of(v)) for k, v in scalars.items()}}
    grid = (Expr(math.ceil(c.N / cfg.BLOCK_N)), Expr(1, (("M", cfg.BLOCK_M),)), 1)
    return _finish(kernel, _int4_gemm_kernel, constexprs, params, grid)


def cuda_tactics() -> dict:
    """The hand-written CUDA C++ tactics by name: small-M ``mma.sync`` (int4_gemm_mma.py) and large-M
    ``wgmma`` (int4_gemm_wgmma.py)."""
    from .int4_gemm_mma import INT4_MMA_TACTICS
    from .int4_gemm_wgmma import INT4_WGMMA_TACTICS

    return {**INT4_MMA_TACTICS, **INT4_WGMMA_TACTICS}


def _cuda_module(cfg):
    from . import int4_gemm_mma, int4_gemm_wgmma

    return int4_gemm_wgmma if isinstance(cfg, int4_gemm_wgmma.Int4WgmmaConfig) else int4_gemm_mma


def build_int4_cuda(c: Int4GemmPlugin, cfg) -> AotKernel:
    """A hand-written CUDA C++ kernel for ``cfg`` (an Int4MmaConfig or Int4WgmmaConfig), compiled by NVRTC;
    no scratch parameters. ``c.tactic`` is not read, so sweeps can build configs outside the tables."""
    module = _cuda_module(cfg)
    name, source = module.kernel_source(cfg, c.dtype, c.N, c.K, c.block_size, c.has_zero_points, c.has_bias)
    params = [("X", "in", "X"), ("B", "in", "B"), ("S", "in", "scales")]
    params += [("ZP", "in", "zero_points")] * c.has_zero_points + [("BIAS", "in", "bias")] * c.has_bias
    params += [("M", "i32", Expr.of("M")), ("Y", "out", "Y")]
    grid = (Expr(-(-c.N // cfg.rows)), Expr(1, (("M", cfg.tokens),)), Expr(1))
    return _nvrtc_kernel(module, cfg, name, source, params, grid)


def _nvrtc_kernel(module, cfg, name: str, source: str, params: list, grid: tuple, shared_mem: int | None = None) -> AotKernel:
    """A hand-written kernel's source compiled by NVRTC for its module's ``ARCH`` and ``PTX_ISA``, with the block
    its config declares and ``shared_mem`` (default: the config's ``dynamic_shared_bytes``)."""
    from .nvrtc import compile_to_ptx

    ptx = compile_to_ptx(source, name + ".cu", options=(f"--gpu-architecture={module.ARCH}", "-std=c++17"),
                         ptx_version=module.PTX_ISA)
    shared_mem = cfg.dynamic_shared_bytes if shared_mem is None else shared_mem
    return AotKernel(name, ptx, cfg.num_warps, shared_mem, tuple(params), grid, module.PROGRAMMATIC_LAUNCH)


def _build_w8a8(c: W8A8GemmPlugin) -> AotKernel:
    from .w8a8_gemm import W8A8_TACTICS, _w8a8_gemm_kernel

    cfg = W8A8_TACTICS[c.tactic]
    dt = _DTYPES[c.out_dtype]
    constexprs = dict(HAS_BIAS=c.has_bias, BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K,
                      GROUP_M=cfg.GROUP_M)
    if not c.has_bias:
        constexprs["BIAS"] = None
    scalars = dict(M="M", N=c.N, K=c.K, stride_am=c.K, stride_bn=c.K, stride_ym=c.N)
    sig = dict(A="*i8", SA="*fp32", B="*i8", SB="*fp32", BIAS=f"*{dt}", Y=f"*{dt}", **{k: "i32" for k in scalars})
    kernel = compile_kernel(_w8a8_gemm_kernel, sig, constexprs, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                            divisible=_div16(**{k: v for k, v in scalars.items() if k != "M"}))
    params = {"A": ("in", "A"), "SA": ("in", "a_scale"), "B": ("in", "B"), "SB": ("in", "b_scale"),
              "BIAS": ("in", "bias"), "Y": ("out", "Y"), **{k: ("i32", Expr.of(v)) for k, v in scalars.items()}}
    grid = (Expr(math.ceil(c.N / cfg.BLOCK_N), (("M", cfg.BLOCK_M),)), 1, 1)
    return _finish(kernel, _w8a8_gemm_kernel, constexprs, params, grid)


def _build_quant(c: QuantizePerTokenPlugin) -> AotKernel:
    from .quantize_per_token import _quantize_per_token_kernel

    if c.norm not in NORMS:
        raise ValueError(f"QuantizePerToken plugin: norm must be one of {NORMS}")
    norm = NORMS.index(c.norm)
    dt = _DTYPES[c.dtype]
    block = triton.next_power_of_2(c.H)
    constexprs = dict(NORM=norm, EPS=float(c.epsilon), BLOCK_H=block)
    if norm == 0:
        constexprs["GAMMA"] = None
    if norm != 2:
        constexprs["BETA"] = None
    scalars = dict(M="M", H=c.H, stride_xm=c.H, stride_qm=c.H)
    sig = dict(X=f"*{dt}", GAMMA=f"*{dt}", BETA=f"*{dt}", Q="*i8", SCALE="*fp32", **{k: "i32" for k in scalars})
    warps = 4 if block <= 2048 else (8 if block <= 8192 else 16)
    kernel = compile_kernel(_quantize_per_token_kernel, sig, constexprs, num_warps=warps, num_stages=1,
                            divisible=_div16(H=c.H, stride_xm=c.H, stride_qm=c.H))
    params = {"X": ("in", "X"), "GAMMA": ("in", "gamma"), "BETA": ("in", "beta"), "Q": ("out", "Q"),
              "SCALE": ("out", "scale"), **{k: ("i32", Expr.of(v)) for k, v in scalars.items()}}
    return _finish(kernel, _quantize_per_token_kernel, constexprs, params, ("M", 1, 1))


def _build_attn(c: FlashAttentionPlugin) -> AotKernel:
    from .flash_attention import ATTN_TACTICS, _flash_attn_fwd_kernel, pick_attn_config
    from .flash_attention_wgmma import ATTN_WGMMA_TACTICS
    from .flash_decode import ATTN_DECODE_TACTICS

    if c.num_heads % c.kv_num_heads:
        raise ValueError("FlashAttention plugin: num_heads must be a multiple of kv_num_heads")
    if c.has_seqlens_k and c.has_key_mask:
        raise ValueError("FlashAttention plugin: seqlens_k and key_mask exclude each other")
    if c.tactic in ATTN_WGMMA_TACTICS:
        return build_attn_cuda(c, ATTN_WGMMA_TACTICS[c.tactic])
    if c.tactic in ATTN_DECODE_TACTICS:
        return build_attn_cuda(c, ATTN_DECODE_TACTICS[c.tactic])
    cfg = ATTN_TACTICS[c.tactic] if c.tactic else pick_attn_config(c.head_dim, 0)
    dt = _DTYPES[c.dtype]
    D, HQ, HKV = c.head_dim, c.num_heads, c.kv_num_heads
    scale = float(c.scale) if c.scale else 1.0 / math.sqrt(D)
    constexprs = dict(SM_SCALE=scale, HEAD_DIM=D, GQA_GROUP=HQ // HKV, IS_CAUSAL=bool(c.causal),
                      MODE=3 if c.has_key_mask else int(c.has_seqlens_k), BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N,
                      SEQ_Q=None)
    if not (c.has_seqlens_k or c.has_key_mask):
        constexprs["SEQ_K"] = None
    # contiguous [B, H, S, D]: batch stride H*S*D and head stride S*D depend on the runtime S
    scalars = dict(SQ="SQ", SK="SK", HQ=HQ,
                   stride_qb=Expr(HQ * D, (("SQ", 1),)), stride_qh=Expr(D, (("SQ", 1),)), stride_qs=D,
                   stride_kb=Expr(HKV * D, (("SK", 1),)), stride_kh=Expr(D, (("SK", 1),)), stride_ks=D,
                   stride_vb=Expr(HKV * D, (("SK", 1),)), stride_vh=Expr(D, (("SK", 1),)), stride_vs=D,
                   stride_ob=Expr(HQ * D, (("SQ", 1),)), stride_oh=Expr(D, (("SQ", 1),)), stride_os=D,
                   stride_lb=Expr(HQ, (("SQ", 1),)), stride_lh=Expr(1, (("SQ", 1),)))
    sig = dict(Q=f"*{dt}", K=f"*{dt}", V=f"*{dt}", SEQ_Q="*i32", SEQ_K="*i32", O=f"*{dt}", LSE="*fp32",
               **{k: "i32" for k in scalars})
    # strides that are multiples of D (>= 16) are divisible by 16 whatever S is
    div = {"stride_qs", "stride_ks", "stride_vs", "stride_os"} if D % 16 == 0 else set()
    div |= {k for k in ("stride_qb", "stride_qh", "stride_kb", "stride_kh", "stride_vb", "stride_vh", "stride_ob",
                        "stride_oh") if D % 16 == 0}
    kernel = compile_kernel(_flash_attn_fwd_kernel, sig, constexprs, num_warps=cfg.num_warps,
                            num_stages=cfg.num_stages, divisible=div)
    params = {"Q": ("in", "Q"), "K": ("in", "K"), "V": ("in", "V"),
              "SEQ_K": ("in", "key_mask" if c.has_key_mask else "seqlens_k"),
              "O": ("out", "O"), "LSE": ("out", "LSE"), **{k: ("i32", Expr.of(v)) for k, v in scalars.items()}}
    grid = (Expr(1, (("SQ", cfg.BLOCK_M),)), Expr(HQ, (("B", 1),)), 1)
    return _finish(kernel, _flash_attn_fwd_kernel, constexprs, params, grid)


def build_attn_cuda(c: FlashAttentionPlugin, cfg) -> AotKernel:
    """A CUDA C++ attention kernel for ``cfg``, compiled by NVRTC: the wgmma prefill kernel (flash_attention_wgmma.py,
    an AttnWgmmaConfig) or the cluster decode kernel (flash_decode.py, an AttnDecodeConfig); no scratch parameters.
    ``c.tactic`` is not read, so sweeps can build configs outside the tables."""
    from . import flash_attention_wgmma as fa
    from . import flash_decode

    if c.head_dim != cfg.D:
        raise ValueError(f"FlashAttention plugin: tactic {cfg.describe()} is for head dim {cfg.D}, not {c.head_dim}")
    decode = isinstance(cfg, flash_decode.AttnDecodeConfig)
    module = flash_decode if decode else fa
    name, source = module.kernel_source(cfg, c.dtype, c.num_heads, c.kv_num_heads, c.causal, c.scale, c.has_seqlens_k,
                                        c.has_key_mask)
    params = [("Q", "in", "Q"), ("K", "in", "K"), ("V", "in", "V")]
    params += [("SEQLENS_K", "in", "seqlens_k")] * c.has_seqlens_k + [("KEY_MASK", "in", "key_mask")] * c.has_key_mask
    params += [("SQ", "i32", Expr.of("SQ")), ("SK", "i32", Expr.of("SK")), ("O", "out", "O"), ("LSE", "out", "LSE")]
    if decode:  # clusters of CLUSTER CTAs along x split one KV head's keys
        grid = (Expr(cfg.CLUSTER), Expr(1, (("SQ", cfg.QT),)), Expr(c.kv_num_heads, (("B", 1),)))
        return _nvrtc_kernel(module, cfg, name, source, params, grid, cfg.dynamic_shared_bytes(c.num_heads // c.kv_num_heads))
    grid = (Expr(1, (("SQ", cfg.BLOCK_M),)), Expr(c.num_heads, (("B", 1),)), Expr(1))
    return _nvrtc_kernel(fa, cfg, name, source, params, grid)
