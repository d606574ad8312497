"""benchmarks/sustained.py without a GPU: bad input and a missing GPU are one-line errors before anything runs."""

import pytest
import torch

pytest.importorskip("triton")

from benchmarks.sustained import main  # noqa: E402


@pytest.mark.parametrize("points", ["1024:4096", "a:b:c", "0:4096:4096"])
def test_malformed_points_are_a_one_line_error(points):
    with pytest.raises(SystemExit) as err:
        main(["--points", points])
    assert str(err.value).startswith("sustained: --points wants M:N:K") and "\n" not in str(err.value)


def test_too_short_a_window_is_a_one_line_error():
    with pytest.raises(SystemExit) as err:
        main(["--seconds", "0.6"])
    assert str(err.value).startswith("sustained: --seconds must be >= 1") and "\n" not in str(err.value)


def test_unknown_tactic_is_a_one_line_error():
    with pytest.raises(SystemExit) as err:
        main(["--tactic", "wgmma_999x999"])
    message = str(err.value)
    assert "unknown tactic 'wgmma_999x999'" in message and "wgmma_128x256" in message and "\n" not in message


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_no_gpu_is_a_one_line_error():
    with pytest.raises(SystemExit) as err:
        main(["--points", "256:4096:4096"])
    assert str(err.value) == "sustained: needs a CUDA GPU (torch.cuda.is_available() is False)"
