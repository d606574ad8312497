"""GPTQ (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", 2022) as a pure torch function, plus the streaming Hessian it needs.

Notation (the paper's): a linear layer computes W X with W ∈ R^{N×K} (rows = output channels; the
transpose of ONNX MatMul's [K, N] weight) and calibration inputs X ∈ R^{K×n} (n tokens). GPTQ picks
quantized Q minimising the layer-output error ‖W X − Q X‖², whose Hessian with respect to each row
of W is

    H = 2 X Xᵀ / n                                                                   (K × K)

(the 1/n only rescales H; it keeps damping and float ranges independent of n). Columns are quantized
one at a time; after quantizing column j, the not-yet-quantized columns absorb its error (Optimal
Brain Surgeon update, eq. 3 of the paper, with F the remaining columns):

    δ_F = −(w_j − q_j) / [H_F⁻¹]_jj · (H_F⁻¹)_{j,F}        H_F⁻¹ ← H_F⁻¹ − (H_F⁻¹)_{:,j} (H_F⁻¹)_{j,:} / [H_F⁻¹]_jj

GPTQ's observations: (1) every row can use the same column order, so H_F⁻¹ is shared by all rows;
(2) the rows (H_F⁻¹)_{j, j:} / sqrt([H_F⁻¹]_jj) of all the successive eliminations are exactly the rows
of the upper Cholesky factor U of H⁻¹ (H⁻¹ = Uᵀ U), computed once; (3) updates can be applied
lazily: columns inside a block of B columns are updated immediately, everything right of the block
once per block with E · U_{block, rest} (E = scaled errors of the block). Numerical safeguards:
damping λ = damp · mean(diag H) added to the diagonal, and "dead" inputs (H_jj = 0: input channel j
was always 0 in calibration) get H_jj = 1, which decouples column j (its H row/column is zero), so it
is quantized by plain rounding. The reference implementation zeroes dead columns instead; that is
exact on the calibration data but wrong for inputs where the channel is not zero, so we keep them.

Act-order: columns are processed by decreasing H_jj (the inputs with the most energy first, while
many columns remain to absorb their error). To keep the group structure contiguous in the original
column order (what every packed format needs: group g = rows [g·G, (g+1)·G) of the [K, N] weight),
group scales are then "static": fixed up front from the original W. Without act-order, a group's
scales are taken when its first column is reached, from the already-updated W (the paper's choice).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import numpy as np
import torch

from qcompiler.algorithms.weight_quant import code_range, compute_qparams, group_index, num_groups

__all__ = ["GPTQResult", "gptq_quantize", "HessianAccumulator", "default_device"]

logger = logging.getLogger(__name__)

_MAX_DAMP_RETRIES = 4


def default_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class HessianAccumulator:
    """Streams H = 2/n Σ_t x_t x_tᵀ over batches of activations, one K × K matrix in memory.

    Each batch's Σ x xᵀ is added into a float32 partial sum (on CPU with BLAS ``ssyrk``, which forms
    only the upper triangle: half the flops of a GEMM; else ``addmm``); every ``flush_every`` batches
    the partial sum is added into the ``dtype`` accumulator, so float32 never sums more than
    ``flush_every`` batches.

    Args:
        k: input channels (the activation's last axis).
        dtype: accumulator dtype (float64 default).
        device: where to accumulate (default: CUDA when present, else CPU).
        flush_every: batches per float32 partial sum.
    """

    def __init__(self, k: int, *, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None,
                 flush_every: int = 16):
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k = k
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else default_device()
        self.flush_every = flush_every
        self._syrk = _cpu_syrk() if self.device.type == "cpu" else None
        self._sum = torch.zeros(k, k, dtype=dtype, device=self.device)
        self._partial = (np.zeros((k, k), np.float32, order="F") if self._syrk is not None
                         else torch.zeros(k, k, dtype=torch.float32, device=self.device))
        self._pending = 0
        self.count = 0

    def add_batch(self, x: np.ndarray | torch.Tensor) -> None:
        """Adds every row x_t of ``x`` [..., K] (tokens on all leading axes)."""
        if x.shape[-1] != self.k:
            raise ValueError(f"activation has {x.shape[-1]} channels, the Hessian expects {self.k}")
        if self._syrk is not None:
            rows = np.ascontiguousarray(np.asarray(x.cpu() if isinstance(x, torch.Tensor) else x,
                                                  np.float32).reshape(-1, self.k))
            # rowsᵀ is a Fortran-ordered [K, n] view: BLAS reads it without a copy (C += A Aᵀ).
            self._partial = self._syrk(1.0, rows.T, beta=1.0, c=self._partial, trans=0, lower=0, overwrite_c=1)
        else:
            x = torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x
            rows = x.reshape(-1, self.k).to(self.device, torch.float32)
            self._partial.addmm_(rows.T, rows)
        self.count += rows.shape[0]
        self._pending += 1
        if self._pending >= self.flush_every:
            self._flush()

    def _flush(self) -> None:
        if self._syrk is not None:
            self._sum += torch.from_numpy(self._partial)
            self._partial[...] = 0.0
        else:
            self._sum += self._partial
            self._partial.zero_()
        self._pending = 0

    def finalize(self) -> torch.Tensor:
        """H = 2/n Σ x xᵀ (in ``dtype``); raises if no rows were added or an activation held NaN/Inf."""
        if self.count == 0:
            raise ValueError("no activations were added to the Hessian")
        self._flush()
        total = self._sum
        if self._syrk is not None:  # only the upper triangle was accumulated
            upper = torch.triu(total)
            total = upper + upper.T - torch.diag(upper.diagonal())
        if not bool(torch.isfinite(total).all()):  # a NaN/Inf anywhere in X reaches the sum
            raise ValueError("activation holds NaN/Inf; check the calibration data and model")
        return total * (2.0 / self.count)


def _cpu_syrk():
    """scipy's BLAS ssyrk, or None when scipy is not installed (then torch's addmm is used)."""
    try:
        from scipy.linalg import blas
    except ImportError:
        return None
    return blas.ssyrk


@dataclass
class GPTQResult:
    """What ``gptq_quantize`` returns (tensors on the CPU).

    Attributes:
        codes: [N, K] integer codes (int16 tensor): signed for symmetric, unsigned for asymmetric.
        scales: [N, G] scales (values rounded to ``scale_dtype``), group g covering input channels [g·G, (g+1)·G).
        zeros: [N, G] zero points (uint8 values) or None when symmetric.
        Q: [N, K] dequantized weight s · (code − z), float32.
        perm: the act-order column order (None without act-order); codes/scales are already in the
            original column order, so no g_idx is needed.
        loss: Σ_j ‖w_j − q_j‖² / (2 [H_F⁻¹]_jj), GPTQ's estimate of the output error it left.
        damp: the damping fraction finally used (raised when H + λI was not positive definite).
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    Q: torch.Tensor
    perm: torch.Tensor | None
    loss: float
    damp: float


@contextlib.contextmanager
def _single_thread_on_cpu(device: torch.device):
    """The column loop is thousands of tiny ops: on CPU, intra-op threads only add barrier waits, and
    when another process shares the cores a preempted worker thread stalls every op (measured 15-25x
    slower on 2 busy cores). One thread is as fast on an idle machine and robust on a busy one."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _upper_cholesky_of_inverse(H: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """U with H_damped⁻¹ = Uᵀ U, H_damped = H + damp · mean(diag H) · I; retries with 10× damping.

    With J the order-reversing permutation, J H J = L Lᵀ (lower Cholesky) gives
    H⁻¹ = (J L⁻ᵀ J)(J L⁻¹ J), and J L⁻¹ J is upper triangular with a positive diagonal: it is U.
    One factorisation and one triangular inverse, instead of factorise, invert, factorise again.
    """
    mean_diag = float(H.diagonal().mean())
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    for attempt in range(_MAX_DAMP_RETRIES):
        used = damp * 10.0 ** attempt
        reversed_damped = H.flip(0, 1)
        reversed_damped.diagonal().add_(used * mean_diag)
        L, info = torch.linalg.cholesky_ex(reversed_damped)
        del reversed_damped  # K x K float64 temporaries add up (19 MB each at K = 1536): keep few alive
        if int(info) == 0:
            U = torch.linalg.solve_triangular(L, eye, upper=False).flip(0, 1)
            del L
            if bool(torch.isfinite(U).all()):
                if attempt:
                    logger.warning("Hessian not positive definite with damp=%g; used damp=%g", damp, used)
                return U, used
    raise ValueError(f"Hessian is not positive definite even with damp={damp * 10.0 ** (_MAX_DAMP_RETRIES - 1):g}")


def _qparams_torch(cols: torch.Tensor, bits: int, symmetric: bool, scale_dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One group's scales/zeros for W columns ``cols`` [N, G'] via the shared numpy definition."""
    scale, zero = compute_qparams(cols.T.double().cpu().numpy(), bits, None, symmetric, scale_dtype)
    to = {"device": cols.device, "dtype": cols.dtype}
    return torch.from_numpy(scale[0].astype(np.float64)).to(**to), (
        None if zero is None else torch.from_numpy(zero[0].astype(np.float64)).to(**to))


def gptq_quantize(W: torch.Tensor | np.ndarray, H: torch.Tensor | np.ndarray, *, bits: int = 4,
                  group_size: int | None = 128, symmetric: bool = True, act_order: bool = True,
                  damp: float = 0.01, block_size: int = 128, device: torch.device | str | None = None,
                  dtype: torch.dtype = torch.float32, scale_dtype=np.float32) -> GPTQResult:
    """Quantizes W [N, K] column by column with error feedback through H [K, K] (see module docstring).

    Args:
        W: weight, rows = output channels (N × K).
        H: Hessian 2 X Xᵀ / n of the layer input (K × K), e.g. ``HessianAccumulator.finalize()``.
        bits: 2, 3, 4 or 8.
        group_size: input channels per scale group (contiguous in the original order), None = per row.
        symmetric: signed codes and zero point 0, or unsigned codes with a zero point per group.
        act_order: process columns by decreasing H_jj (with static groups, see above).
        damp: λ = damp · mean(diag H) added to H's diagonal.
        block_size: B, columns per lazy batch update. With dynamic groups it is rounded to a multiple of
            the group size (at least one group), so each group's scales see its fully updated columns.
        device: where to compute (default CUDA when present, else CPU).
        dtype: working precision of the column loop (float32; tests use float64).
        scale_dtype: numpy dtype the scales are stored in (the weight's float type).

    Returns:
        GPTQResult with codes, scales, zeros and the dequantized Q, on the CPU.
    """
    device = torch.device(device) if device is not None else default_device()
    return _gptq(W, H, bits=bits, group_size=group_size, symmetric=symmetric, act_order=act_order,
                 damp=damp, block_size=block_size, device=device, dtype=dtype, scale_dtype=scale_dtype)


def _gptq(W, H, *, bits, group_size, symmetric, act_order, damp, block_size, device, dtype, scale_dtype) -> GPTQResult:
    W = torch.as_tensor(W).to(device=device, dtype=dtype).clone()
    H = torch.as_tensor(H).to(device=device, dtype=torch.float64)  # may be the caller's: never edit in place
    n_rows, k = W.shape
    if H.shape != (k, k):
        raise ValueError(f"H must be [{k}, {k}] for W of shape {tuple(W.shape)}, got {tuple(H.shape)}")
    if not (torch.isfinite(H).all() and torch.isfinite(W).all()):
        raise ValueError("W or H holds NaN/Inf")
    qmin, qmax = code_range(bits, symmetric)
    n_groups = num_groups(k, group_size)
    group_of = torch.from_numpy(group_index(k, group_size))
    static = act_order or group_size is None

    dead = H.diagonal() == 0
    if bool(dead.any()):
        H = H.clone()
        H[dead, dead] = 1.0

    # Scales and zero points as [G, N] (compute_qparams' layout): row g is what column j of group g reads.
    scales_t = torch.zeros(n_groups, n_rows, dtype=dtype, device=device)
    zeros_t = None if symmetric else torch.zeros(n_groups, n_rows, dtype=dtype, device=device)
    if static:
        s, z = compute_qparams(W.T.double().cpu().numpy(), bits, group_size, symmetric, scale_dtype)
        scales_t.copy_(torch.from_numpy(s.astype(np.float64)))
        if zeros_t is not None:
            zeros_t.copy_(torch.from_numpy(z.astype(np.float64)))

    perm = None
    if act_order:
        perm = torch.argsort(H.diagonal(), descending=True, stable=True)
        W = W[:, perm]
        H = H.index_select(0, perm).index_select(1, perm)
        group_of = group_of[perm.cpu()]

    U, used_damp = _upper_cholesky_of_inverse(H, damp)
    U = U.to(dtype)
    del H

    step = block_size
    if not static:
        step = max(group_size, (block_size // group_size) * group_size)
        if step != block_size:
            logger.debug("GPTQ block size %d -> %d (multiple of group size %d)", block_size, step, group_size)

    # Columns of W are rows here ([K, N], contiguous), so every per-column op reads contiguous memory.
    WT = W.T.contiguous()
    del W
    group_of = group_of.tolist()
    codes_t = torch.empty(k, n_rows, dtype=dtype, device=device)
    QT = torch.empty_like(WT)
    inverse_diag = (1.0 / U.diagonal()).tolist()
    loss = 0.0
    for i1 in range(0, k, step):
        i2 = min(i1 + step, k)
        W1, C1, Q1 = WT[i1:i2], codes_t[i1:i2], QT[i1:i2]
        E1 = torch.empty_like(W1)
        U1 = U[i1:i2, i1:i2]
        with _single_thread_on_cpu(device):
            for i in range(i2 - i1):
                j = i1 + i
                g = group_of[j]
                if not static and j % group_size == 0:
                    s, z = _qparams_torch(W1[i:i + group_size].T, bits, symmetric, scale_dtype)
                    scales_t[g] = s
                    if zeros_t is not None:
                        zeros_t[g] = z
                w, c, q, e = W1[i], C1[i], Q1[i], E1[i]
                torch.div(w, scales_t[g], out=c).round_()
                if zeros_t is not None:
                    c.add_(zeros_t[g]).clamp_(qmin, qmax)
                    torch.sub(c, zeros_t[g], out=q).mul_(scales_t[g])
                else:
                    c.clamp_(qmin, qmax)
                    torch.mul(c, scales_t[g], out=q)
                torch.sub(w, q, out=e).mul_(inverse_diag[j])
                W1[i + 1:].addr_(U1[i, i + 1:], e, alpha=-1.0)
        loss += float((E1.double() ** 2).sum()) / 2
        WT[i2:].addmm_(U[i1:i2, i2:].T, E1, alpha=-1.0)

    Q, codes = QT.T.contiguous(), codes_t.T.to(torch.int16).contiguous()
    if perm is not None:
        inverse = torch.argsort(perm)
        Q = Q[:, inverse]
        codes = codes[:, inverse]
    return GPTQResult(
        codes=codes.cpu(),
        scales=scales_t.T.cpu(),
        zeros=None if zeros_t is None else zeros_t.T.cpu(),
        Q=Q.cpu().to(torch.float32),
        perm=None if perm is None else perm.cpu(),
        loss=float(loss),
        damp=used_damp,
    )
