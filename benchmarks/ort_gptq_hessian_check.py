"""Does ONNX Runtime's GPTQ use the Hessian? Quantizes one weight with two different Hessians and compares.

ONNX Runtime's ``neural_compressor.weight_only.gptq`` (what ``MatMulNBitsQuantizer`` with
``GPTQWeightOnlyQuantConfig`` runs) feeds each column's rounding error forward with ``Hinv1[i:, i]``, a
column of the *upper* Cholesky factor of H⁻¹, which is zero below the diagonal: no error reaches later
columns. Without act-order the result is round-to-nearest whatever the calibration data; with act-order
only the column order (hence the groups) depends on H. This script shows both.

    python benchmarks/ort_gptq_hessian_check.py
"""

from __future__ import annotations

import numpy as np
from onnxruntime.quantization.neural_compressor.weight_only import gptq


def main() -> None:
    w = np.random.default_rng(0).normal(size=(256, 64)).astype(np.float32)  # [K, N], ORT's layout
    for act_order in (False, True):
        results = []
        for seed in (1, 2):
            rng = np.random.default_rng(seed)
            x = rng.normal(size=(1000, 256)) @ rng.normal(size=(256, 256))  # correlated inputs
            results.append(gptq(w.copy(), 2 * x.T @ x / len(x), num_bits=4, group_size=128, scheme="sym",
                                blocksize=128, percdamp=0.01, actorder=act_order))
        print(f"act-order {'on ' if act_order else 'off'}: same result for two different Hessians: "
              f"{np.array_equal(results[0], results[1])}")


if __name__ == "__main__":
    main()
