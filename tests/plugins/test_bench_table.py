"""The report helpers the INT4 benchmark scripts share (benchmarks/bench_int4_gemm.py), without a GPU."""

import pytest

pytest.importorskip("triton")

from benchmarks.bench_int4_gemm import SHAPES, Table, parse_shapes, shapes_and_out  # noqa: E402


def test_parse_shapes():
    assert parse_shapes("11008:4096,4096:11008", [(1, 2)]) == [(11008, 4096), (4096, 11008)]
    assert parse_shapes(None, [(1, 2)]) == [(1, 2)]


def test_shapes_and_out():
    assert shapes_and_out(["--shapes", "11008:4096", "--out", "t.md"]) == ([(11008, 4096)], "t.md")
    assert shapes_and_out([]) == (list(SHAPES), None)


def test_table_prints_rows_as_added_and_writes_head_rows_and_after(tmp_path, capsys):
    out = tmp_path / "t.md"
    table = Table(["# title", "", "| a |", "|---|"], str(out))
    table.add("| 1 |")
    assert capsys.readouterr().out == "# title\n\n| a |\n|---|\n| 1 |\n"
    assert not out.exists()  # nothing is written before write()
    table.write(["", "detail"])
    table.add("| 2 |")
    table.write()
    assert out.read_text() == "# title\n\n| a |\n|---|\n| 1 |\n| 2 |\n"
    assert [p.name for p in tmp_path.iterdir()] == ["t.md"]  # no temporary file left behind


def test_table_without_out_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Table(["| a |"]).write(["x"])
    assert list(tmp_path.iterdir()) == []


def test_fastest_tactic_returns_the_name_and_time_of_the_smallest_timing():
    from benchmarks.bench_int4_gemm import fastest_tactic

    timings = iter([3.0, 1.5, 2.0])  # the timer is handed one closure per name, in order; none is run here
    names = ["mma_n8_w8", "mma_n32_w4_sw", "mma_n32_w16_sw"]
    assert fastest_tactic(names, None, None, None, timer=lambda fn: next(timings)) == ("mma_n32_w4_sw", 1.5)


@pytest.mark.parametrize("spec", ["11008", "11008:4096:1", "a:b", "0:4096", "11008:-1", ","])
def test_parse_shapes_refuses_malformed_specs_in_one_line(spec):
    with pytest.raises(SystemExit, match=r"^--shapes wants N:K,\.\.\. of positive integers, got "):
        parse_shapes(spec, [(1, 2)])


@pytest.mark.parametrize("module", ["read_floor", "l2_flush", "fixed_cost"])
def test_gpu_scripts_refuse_a_machine_without_a_gpu_in_one_line(module, monkeypatch):
    import importlib

    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    main = importlib.import_module(f"benchmarks.{module}").main
    with pytest.raises(SystemExit) as err:
        main(["--shapes", "4096:4096"])
    assert str(err.value) == f"{module}: needs a CUDA GPU (torch.cuda.is_available() is False)"
