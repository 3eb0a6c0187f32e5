"""The GPU copy probe: the skip path, the pure parts, and the register/copy/unregister protocol.

No GPU exists where these run: the CUDA calls are replaced by a stand-in that records them, while the
host buffer is a real Region and the copies are real (CPU) tensor copies.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from fixture_paths import fixture_root

from tieremu.errors import ProbeError
from tieremu.numa.topology import discover
from tieremu.probe import gpu
from tieremu.probe.gpu import (
    GpuNodeResult,
    GpuResult,
    batch_for,
    block_sizes,
    cuda_unavailable_reason,
    issuing_cpus,
    make_point,
    pci_numa_node,
    run_gpu,
    to_rows,
)

KiB, MiB = 1 << 10, 1 << 20


# ---------------------------------------------------------------------------------------------- skip path


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA; the skip path is not taken")
def test_without_cuda_the_result_says_why_instead_of_raising() -> None:
    result = run_gpu(discover("/"), quick=True)
    assert not result.ran
    assert "torch" in result.skipped and ("without CUDA" in result.skipped or "sees no GPU" in result.skipped)
    assert result.nodes == [] and to_rows(result) == []
    assert result.torch_version == torch.__version__


def _fake_torch(cuda: str | None, available: bool = False, hip: str | None = None) -> SimpleNamespace:
    return SimpleNamespace(__version__="9.9.9", version=SimpleNamespace(cuda=cuda, hip=hip),
                           cuda=SimpleNamespace(is_available=lambda: available))


def test_unavailable_reasons_name_the_cause(monkeypatch: pytest.MonkeyPatch) -> None:
    assert "built without CUDA" in cuda_unavailable_reason(_fake_torch(None))
    assert "ROCm" in cuda_unavailable_reason(_fake_torch(None, hip="6.0"))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert "CUDA_VISIBLE_DEVICES=''" in cuda_unavailable_reason(_fake_torch("12.4"))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert "no driver or no device" in cuda_unavailable_reason(_fake_torch("12.4"))
    assert cuda_unavailable_reason(_fake_torch("12.4", available=True)) == ""


# ---------------------------------------------------------------------------------------------- pure parts


def test_block_size_ladders_span_8k_to_64m() -> None:
    full = block_sizes(quick=False)
    assert full[0] == 8 * KiB and full[-1] == 64 * MiB and len(full) == 14
    assert all(b == 2 * a for a, b in itertools.pairwise(full))
    assert block_sizes(quick=True) == (8 * KiB, 32 * KiB, 128 * KiB, 512 * KiB, 2 * MiB, 8 * MiB, 32 * MiB, 64 * MiB)


def test_batches_move_enough_bytes_but_stay_bounded() -> None:
    assert [batch_for(b) for b in (8 * KiB, 128 * KiB, 1 * MiB, 32 * MiB, 64 * MiB)] == [256, 256, 32, 1, 1]


def test_make_point_turns_event_milliseconds_into_gbps_and_us() -> None:
    p = make_point(1, "h2d", 1 * MiB, 32, batch_ms=[2.0, 4.0, 3.0], single_ms=[0.01, 0.03, 0.02])
    per_batch = 32 * MiB
    assert p.bandwidth_gbps.median == pytest.approx(per_batch / 0.003 / 1e9)
    assert p.bandwidth_gbps.max == pytest.approx(per_batch / 0.002 / 1e9)
    assert p.bandwidth_gbps.n == 3
    assert p.latency_us.median == pytest.approx(20.0)
    assert (p.node, p.direction, p.block_bytes, p.batch) == (1, "h2d", 1 * MiB, 32)


def test_make_point_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="direction"):
        make_point(0, "sideways", 8 * KiB, 1, [1.0], [1.0])
    with pytest.raises(ProbeError, match="not positive"):
        make_point(0, "d2h", 8 * KiB, 1, [1.0, 0.0], [1.0])
    with pytest.raises(ProbeError, match="no timings"):
        make_point(0, "d2h", 8 * KiB, 1, [], [1.0])


def test_rows_one_per_node_direction_and_block() -> None:
    points = [make_point(2, d, 8 * KiB, 256, [1.0, 1.0], [0.005, 0.007]) for d in ("h2d", "d2h")]
    node = GpuNodeResult(node=2, cpus=(0, 1), cpus_node=0, placed_fraction=1.0, pinned=True, points=points)
    result = GpuResult(device="Fake GPU", device_index=0, gpu_numa_node=0, torch_version="x", nodes=[node])
    rows = to_rows(result)
    assert [(r["node"], r["cpus_node"], r["direction"], r["block_bytes"]) for r in rows] == [
        (2, 0, "h2d", 8 * KiB), (2, 0, "d2h", 8 * KiB)]
    assert rows[0]["GB/s"] == pytest.approx(round(8 * KiB * 256 / 1e-3 / 1e9, 3))
    assert rows[0]["lat_p50_us"] == pytest.approx(6.0)
    assert rows[0]["GB/s_spread"] == 0.0 and rows[0]["repeats"] == 2
    assert {r["origin"] for r in rows} == {"measured"} and {r["pinned"] for r in rows} == {True}


def test_cpuless_nodes_borrow_the_nearest_cpu_node() -> None:
    topo = discover(fixture_root("cxl-expander"))
    everything = set(range(96))
    assert issuing_cpus(topo, 1, everything) == (1, (*range(24, 48), *range(72, 96)))
    assert issuing_cpus(topo, 2, everything)[0] == 0  # distance 14 to node 0, 24 to node 1
    assert issuing_cpus(topo, 3, everything)[0] == 1
    # Only node 0's first two CPUs allowed (a cpuset): node 3 falls back to node 0, within the set.
    assert issuing_cpus(topo, 3, {0, 1}) == (0, (0, 1))
    with pytest.raises(ProbeError, match="no CPU"):
        issuing_cpus(topo, 3, {500})


def test_pci_numa_node_reads_sysfs(tmp_path: Path) -> None:
    dev = tmp_path / "sys/bus/pci/devices/0000:3b:00.0"
    dev.mkdir(parents=True)
    (dev / "numa_node").write_text("1\n")
    assert pci_numa_node("0000:3B:00.0", tmp_path) == 1
    (dev / "numa_node").write_text("-1\n")
    assert pci_numa_node("0000:3b:00.0", tmp_path) is None
    assert pci_numa_node("0000:99:00.0", tmp_path) is None


# ---------------------------------------------------------------------------------------------- the CUDA protocol


class _Cudart:
    def __init__(self, register_rc: int = 0) -> None:
        self.register_rc = register_rc
        self.calls: list[tuple] = []

    def cudaHostRegister(self, ptr: int, nbytes: int, flags: int) -> int:
        self.calls.append(("register", ptr, nbytes, flags))
        return self.register_rc

    def cudaHostUnregister(self, ptr: int) -> int:
        self.calls.append(("unregister", ptr))
        return 0


class _Stream:
    def synchronize(self) -> None:
        pass


def _cuda_stand_in(cudart: _Cudart, elapsed_ms: float | Exception = 0.5) -> SimpleNamespace:
    class Event:
        def __init__(self, enable_timing: bool) -> None:
            assert enable_timing

        def record(self, stream: _Stream) -> None:
            assert isinstance(stream, _Stream)  # timed on the probe's stream, not the default one

        def synchronize(self) -> None:
            pass

        def elapsed_time(self, _end: Event) -> float:
            if isinstance(elapsed_ms, Exception):
                raise elapsed_ms
            return elapsed_ms

    cuda = SimpleNamespace(cudart=lambda: cudart, Event=Event, stream=lambda _s: contextlib.nullcontext(),
                           synchronize=lambda _d=None: None)
    return SimpleNamespace(uint8=torch.uint8, cuda=cuda)


def _probe(fake: SimpleNamespace, device_buf: torch.Tensor, sizes: tuple[int, ...]) -> GpuNodeResult:
    cpus = tuple(sorted(os.sched_getaffinity(0)))
    return gpu._probe_node(fake, 0, 0, cpus, sizes, device_buf, _Stream(), repeats=3, warmup=1)


def test_node_probe_registers_copies_both_ways_and_unregisters() -> None:
    cudart = _Cudart()
    sizes = (8 * KiB, 64 * KiB)
    device_buf = torch.full((sizes[-1],), 7, dtype=torch.uint8)
    out = _probe(_cuda_stand_in(cudart), device_buf, sizes)
    register, unregister = cudart.calls
    assert register[0] == "register" and register[2] == sizes[-1] and register[3] == 0
    assert unregister == ("unregister", register[1])
    assert out.placed_fraction == 1.0
    assert [(p.block_bytes, p.direction) for p in out.points] == [
        (8 * KiB, "h2d"), (8 * KiB, "d2h"), (64 * KiB, "h2d"), (64 * KiB, "d2h")]
    assert out.points[0].bandwidth_gbps.median == pytest.approx(8 * KiB * 256 / 0.5e-3 / 1e9)
    # h2d runs first and copies the (zeroed) host buffer over the device one: wired the other way round,
    # the device buffer would keep its 7s.
    assert int(device_buf.sum()) == 0


def test_node_probe_unregisters_even_when_timing_fails() -> None:
    cudart = _Cudart()
    with pytest.raises(RuntimeError, match="event exploded"):
        _probe(_cuda_stand_in(cudart, RuntimeError("event exploded")), torch.zeros(8 * KiB, dtype=torch.uint8),
               (8 * KiB,))
    assert [c[0] for c in cudart.calls] == ["register", "unregister"]


def test_failed_registration_is_a_probe_error_and_nothing_is_unregistered() -> None:
    cudart = _Cudart(register_rc=2)
    with pytest.raises(ProbeError, match=r"cudaHostRegister .* failed with cudaError 2"):
        _probe(_cuda_stand_in(cudart), torch.zeros(8 * KiB, dtype=torch.uint8), (8 * KiB,))
    assert [c[0] for c in cudart.calls] == ["register"]
