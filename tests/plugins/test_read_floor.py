"""The read kernels of benchmarks/read_floor.py (the floor the INT4 kernels are measured against): they compile for
sm_90 without spills (CPU), and on the GPU each reads every byte it is given, including a partial last stage of the
producer-fed bulk read (``pytest -m gpu``)."""

import pytest

from tests.plugins.cuda_kernels import assemble, ptxas_or_skip

KERNELS = ("stream_read", "stream4_read", "pattern_read", "pattern_x_read", "pattern128_read", "bulk_read")


def test_read_kernels_compile_without_spills(tmp_path):
    ptxas_or_skip()
    from benchmarks.read_floor import _SOURCE, PTX_ISA
    from qcompiler.plugins.nvrtc import compile_to_ptx

    ptx = compile_to_ptx(_SOURCE, "read_floor.cu", ptx_version=PTX_ISA)
    assert "ld.global.nc.L1::no_allocate.L2::256B.v4.u32" in ptx  # the pattern reads load like the INT4 kernel
    log, sass = assemble(ptx, "sm_90", tmp_path)
    assert "0 bytes spill stores" in log and all(f"Function : {k}" in sass for k in KERNELS), log
    assert "UBLKCP" in sass  # the bulk read really issues bulk copies


@pytest.mark.gpu
def test_bulk_read_reads_every_stage_to_the_last_bytes():
    torch = pytest.importorskip("torch")
    pytest.importorskip("cupy")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    import numpy as np

    from benchmarks.read_floor import READ_MARK, read_kernels

    rows, row_bytes = 64, 5504  # two CTAs of 32 rows; K = 11008: 10 stages of 512 bytes per row and a last of 384
    mark = READ_MARK - (1 << 32)  # as int32
    weight = torch.zeros(rows, row_bytes // 4, dtype=torch.int32, device="cuda")
    weight[31::32, -4] = mark  # one word in the last 16 bytes of each CTA's last row: its reader's XOR is the mark
    launch = read_kernels()
    launch.out.zero_()
    launch("bulk_read", (rows // 32,), (160,), np.uint64(weight.data_ptr()), np.int32(row_bytes))
    torch.cuda.synchronize()
    assert launch.out[: rows // 32].tolist() == [mark, mark]
    assert not launch.out[rows // 32:].any()


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["stream_read", "stream4_read"])
def test_stream_read_covers_every_16_bytes_of_a_tensor(name):
    torch = pytest.importorskip("torch")
    pytest.importorskip("cupy")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from benchmarks.read_floor import READ_MARK, read_kernels

    threads = torch.cuda.get_device_properties(0).multi_processor_count * 8 * 256  # launch.stream's grid
    data = torch.zeros(2 * threads * 4, dtype=torch.int32, device="cuda")  # two 16-byte pieces per thread
    data[-4] = READ_MARK - (1 << 32)  # the last piece: the last thread's second trip; its XOR is the mark
    launch = read_kernels()
    launch.out.zero_()
    launch.stream(data, name)
    torch.cuda.synchronize()
    flagged = launch.out.nonzero().flatten().tolist()
    assert flagged == [(threads - 1) // 256]
