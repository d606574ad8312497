"""The fit benchmarks/fixed_cost.py reports (fixed µs + bytes / rate), without a GPU."""

import numpy as np
import pytest

pytest.importorskip("triton")

from benchmarks.fixed_cost import fit_fixed_rate, rows_for  # noqa: E402


def test_fit_recovers_a_fixed_cost_and_a_rate():
    nbytes = np.array([10e6, 15e6, 20e6, 25e6])
    us = 8.5 + nbytes / 3.2e6  # 8.5 µs fixed, 3.2 TB/s = 3.2e6 bytes per µs
    fixed, rate, residual = fit_fixed_rate(nbytes, us)
    assert fixed == pytest.approx(8.5)
    assert rate == pytest.approx(3.2)
    assert residual < 1e-9


def test_fit_reports_the_largest_residual():
    fixed, rate, residual = fit_fixed_rate([1e6, 2e6, 3e6], [1.0, 3.0, 3.0])
    assert residual == pytest.approx(2 / 3)  # the line through (1, 1.33), (2, 2.33), (3, 3.33)
    assert rate == pytest.approx(1.0)


def test_fit_refuses_a_single_size():
    with pytest.raises(ValueError, match="two different byte counts"):
        fit_fixed_rate([5e6, 5e6], [1.0, 2.0])


def test_rows_are_multiples_of_64_up_to_n():
    assert rows_for(11008) == [5504, 6848, 8256, 9600, 11008]
    assert all(n % 64 == 0 for n in rows_for(4096)) and rows_for(4096)[-1] == 4096
