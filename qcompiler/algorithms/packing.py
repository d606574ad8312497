"""Bit packing of integer weight codes for the two weight-only lowerings.

(a) ONNX INT4 / UINT4 tensors (``TensorProto.INT4`` / ``UINT4``, opset 21, IR >= 10): the tensor's
    elements in row-major order, two per byte, element 2i in the low nibble and 2i+1 in the high
    nibble of byte i; an odd count leaves the last high nibble 0. Signed values are 4-bit two's
    complement. Stored as ``raw_data`` (what ``onnx.numpy_helper.from_array`` writes for int4 arrays).

(b) ONNX Runtime ``com.microsoft.MatMulNBits`` (contrib op spec, bits ∈ {2, 4, 8} on ORT CPU):
    the weight is stored transposed and blocked along K:

        B            uint8 [N, k_blocks, blob_size],  k_blocks = ceil(K / block_size),
                     blob_size = block_size · bits / 8
        scales       [N, k_blocks] (same float type as the activation A)
        zero_points  optional, uint8 [N, ceil(k_blocks · bits / 8)], packed like B along the block axis;
                     absent means 2^(bits-1) for every block

    Codes are unsigned; within a byte, lower-index elements sit in lower bits ("low-first"): for
    4 bits, element 2i in bits 0-3 and 2i+1 in bits 4-7; for 2 bits, four elements at bits 0-1, 2-3,
    4-5, 6-7. K is padded up to k_blocks · block_size with ``pad_code`` (use the zero point, so the
    padding dequantizes to 0). The dequantized weight is W[n, k] = (code - zero_point) · scale.

The GPU helper's ``qcompiler::Int4Gemm`` shares layout (b) for 4 bits, hence the public
``pack_matmul_nbits`` / ``unpack_matmul_nbits``.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx

__all__ = [
    "pack_low_first", "unpack_low_first", "pack_int4", "unpack_int4", "int4_tensor_proto",
    "MATMUL_NBITS_BITS", "matmul_nbits_shapes", "pack_matmul_nbits", "unpack_matmul_nbits",
    "pack_matmul_nbits_zero_points", "unpack_matmul_nbits_zero_points",
]

logger = logging.getLogger(__name__)

# Bit widths ONNX Runtime 1.31's CPU MatMulNBits kernel accepts (it rejects 3, 5, 6, 7).
MATMUL_NBITS_BITS = (2, 4, 8)


def _check_bits(bits: int) -> int:
    if bits not in (1, 2, 4, 8):
        raise ValueError(f"low-first byte packing needs bits dividing 8 (1, 2, 4, 8), got {bits}")
    return 8 // bits


def pack_low_first(values: np.ndarray, bits: int) -> np.ndarray:
    """Packs unsigned ``bits``-wide values along the last axis, low bits first.

    Args:
        values: integer array [..., M] with values in [0, 2^bits); M is padded with zeros to a multiple
            of 8 / bits.
        bits: 1, 2, 4 or 8.

    Returns:
        uint8 [..., ceil(M · bits / 8)].
    """
    per_byte = _check_bits(bits)
    values = np.asarray(values)
    if values.size and (values.min() < 0 or values.max() >= (1 << bits)):
        raise ValueError(f"values must lie in [0, {1 << bits}) to pack into {bits} bits")
    m = values.shape[-1]
    padded_m = -(-m // per_byte) * per_byte
    v = np.zeros(values.shape[:-1] + (padded_m,), np.uint8)
    v[..., :m] = values
    v = v.reshape(values.shape[:-1] + (padded_m // per_byte, per_byte))
    out = np.zeros(v.shape[:-1], np.uint8)
    for i in range(per_byte):
        out |= v[..., i] << np.uint8(bits * i)
    return out


def unpack_low_first(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of ``pack_low_first``: uint8 [..., B] -> uint8 [..., count]."""
    per_byte = _check_bits(bits)
    packed = np.asarray(packed, np.uint8)
    if count > packed.shape[-1] * per_byte:
        raise ValueError(f"{packed.shape[-1]} bytes hold at most {packed.shape[-1] * per_byte} {bits}-bit values")
    mask = np.uint8((1 << bits) - 1)
    parts = [(packed >> np.uint8(bits * i)) & mask for i in range(per_byte)]
    out = np.stack(parts, axis=-1).reshape(packed.shape[:-1] + (packed.shape[-1] * per_byte,))
    return out[..., :count]


def pack_int4(values: np.ndarray, signed: bool) -> bytes:
    """Raw bytes of an ONNX INT4 (signed) or UINT4 tensor holding ``values`` (row-major, low nibble first)."""
    values = np.asarray(values)
    lo, hi = (-8, 7) if signed else (0, 15)
    if values.size and (values.min() < lo or values.max() > hi):
        raise ValueError(f"values outside [{lo}, {hi}] cannot be stored as {'INT4' if signed else 'UINT4'}")
    nibbles = (values.astype(np.int16).ravel() & 0xF).astype(np.uint8)
    return pack_low_first(nibbles, 4).tobytes()


def unpack_int4(raw: bytes | np.ndarray, shape: tuple[int, ...], signed: bool) -> np.ndarray:
    """Values of an INT4/UINT4 tensor's raw bytes: int8 (signed) or uint8 array of ``shape``."""
    count = int(np.prod(shape, dtype=np.int64))
    nibbles = unpack_low_first(np.frombuffer(bytes(raw), np.uint8), 4, count)
    if signed:
        values = nibbles.astype(np.int8)
        values[values > 7] -= 16
        return values.reshape(shape)
    return nibbles.reshape(shape)


def int4_tensor_proto(name: str, values: np.ndarray, signed: bool) -> onnx.TensorProto:
    """An INT4 (signed) / UINT4 initializer with ``values``' shape, packed two per byte."""
    data_type = onnx.TensorProto.INT4 if signed else onnx.TensorProto.UINT4
    return onnx.helper.make_tensor(name, data_type, list(np.shape(values)), pack_int4(values, signed), raw=True)


def matmul_nbits_shapes(k: int, n: int, bits: int, block_size: int) -> dict[str, tuple[int, ...]]:
    """Shapes of MatMulNBits' B, scales and packed zero_points for a [K, N] weight."""
    _check_bits(bits)
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"MatMulNBits block_size must be a power of two >= 16, got {block_size}")
    k_blocks = -(-k // block_size)
    return {"B": (n, k_blocks, block_size * bits // 8), "scales": (n, k_blocks),
            "zero_points": (n, -(-k_blocks * bits // 8))}


def pack_matmul_nbits(codes_nk: np.ndarray, bits: int, block_size: int, pad_code: int = 0) -> np.ndarray:
    """MatMulNBits' B from unsigned codes laid out [N, K] (one row per output channel).

    Args:
        codes_nk: integers in [0, 2^bits), shape [N, K] (the transpose of MatMul's [K, N] weight).
        bits: 2, 4 or 8.
        block_size: power of two >= 16.
        pad_code: code written into the padding of the last block (give the zero point).

    Returns:
        uint8 [N, ceil(K / block_size), block_size · bits / 8].
    """
    n, k = codes_nk.shape
    shape = matmul_nbits_shapes(k, n, bits, block_size)["B"]
    padded = np.full((n, shape[1] * block_size), pad_code, np.uint8)
    padded[:, :k] = codes_nk
    return pack_low_first(padded.reshape(n, shape[1], block_size), bits)


def unpack_matmul_nbits(packed: np.ndarray, k: int, bits: int, block_size: int) -> np.ndarray:
    """Inverse of ``pack_matmul_nbits``: uint8 [N, k_blocks, blob_size] -> codes uint8 [N, K]."""
    n, k_blocks, blob = packed.shape
    if blob * 8 != block_size * bits or k_blocks != -(-k // block_size):
        raise ValueError(f"B of shape {packed.shape} does not fit K={k}, bits={bits}, block_size={block_size}")
    return unpack_low_first(packed, bits, block_size).reshape(n, k_blocks * block_size)[:, :k]


def pack_matmul_nbits_zero_points(zero_points: np.ndarray, bits: int) -> np.ndarray:
    """MatMulNBits' packed zero_points: uint8 [N, k_blocks] -> uint8 [N, ceil(k_blocks · bits / 8)]."""
    return pack_low_first(zero_points, bits)


def unpack_matmul_nbits_zero_points(packed: np.ndarray, bits: int, k_blocks: int) -> np.ndarray:
    """Inverse of ``pack_matmul_nbits_zero_points``."""
    return unpack_low_first(packed, bits, k_blocks)
