"""benchmarks/sustained.py without a GPU: a tactic it does not know is refused before anything runs."""

import pytest

pytest.importorskip("triton")

from benchmarks.sustained import main  # noqa: E402


def test_unknown_tactic_is_a_one_line_error():
    with pytest.raises(SystemExit) as err:
        main(["--tactic", "wgmma_999x999"])
    message = str(err.value)
    assert "unknown tactic 'wgmma_999x999'" in message and "wgmma_128x256" in message and "\n" not in message
