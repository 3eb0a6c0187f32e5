"""The fio storage probe: parsing real fio JSON, the error paths, cleanup, and one short real run."""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest

from tieremu.errors import ProbeError
from tieremu.probe import storage
from tieremu.probe.storage import (
    JobSpec,
    StoragePlan,
    StorageResult,
    fio_argv,
    mount_of,
    parse_fio_json,
    run_storage,
    to_rows,
)

FIXTURES = Path(__file__).parent / "fixtures" / "fio"
needs_fio = pytest.mark.skipif(shutil.which("fio") is None, reason="fio is not installed (scripts/bootstrap.sh)")

TINY = StoragePlan(
    jobs=(JobSpec("randread", 4096, 1), JobSpec("write", 65536, 4)),
    file_size=8 << 20,
    runtime_s=0.3,
    ramp_s=0.0,
)


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


@pytest.fixture
def fake_fio(tmp_path: Path) -> Path:
    """A stand-in fio that answers --version and --enghelp and fails every job with a message on stderr."""
    script = tmp_path / "bin" / "fio"
    script.parent.mkdir()
    script.write_text(
        "#!/bin/sh\n"
        'case "$1" in\n'
        "  --version) echo fio-3.33; exit 0;;\n"
        "  --enghelp=*) exit 0;;\n"
        "esac\n"
        'echo "fio: pretend the device went away" >&2\n'
        "exit 3\n"
    )
    script.chmod(0o755)
    return script


@pytest.fixture
def target(tmp_path: Path) -> Path:
    """The directory a probe runs in, separate from tmp_path's helper files so leftovers are visible."""
    d = tmp_path / "tier"
    d.mkdir()
    return d


# ---------------------------------------------------------------------------------------------- parsing


def test_parse_randread_with_total_latency_percentiles() -> None:
    [job] = parse_fio_json(fixture("randread-4k-qd1.json"))
    assert (job.name, job.rw, job.direction) == ("randread-4k-qd1", "randread", "read")
    assert (job.bs, job.iodepth, job.ioengine, job.direct) == (4096, 1, "libaio", True)
    assert job.bw_bytes == 49634845
    assert job.iops == pytest.approx(12116.883117)
    assert (job.runtime_ms, job.total_ios, job.error) == (1001, 12129, 0)
    assert job.lat_mean_ns == pytest.approx(81301.589331)
    assert (job.lat_p50_ns, job.lat_p99_ns, job.lat_p999_ns) == (69120, 195584, 1925120)
    assert (job.clat_p50_ns, job.clat_p99_ns, job.clat_p999_ns) == (1640, 101888, 1138688)
    # fio gave total-latency percentiles, so the headline figures are those, not the completion ones.
    assert job.percentiles_of == "total"
    assert (job.p50_ns, job.p99_ns, job.p999_ns) == (69120, 195584, 1925120)
    assert job.mb_per_s == pytest.approx(49.634845)


def test_parse_seq_write_falls_back_to_completion_percentiles() -> None:
    [job] = parse_fio_json(fixture("write-1m-qd8.json"))
    assert (job.rw, job.direction, job.bs, job.iodepth, job.direct) == ("write", "write", 1 << 20, 8, True)
    assert job.bw_bytes == 1635155643
    assert job.iops == pytest.approx(1559.405941)
    assert job.runtime_ms == 1010
    assert job.lat_mean_ns == pytest.approx(5118955.305397)
    assert job.lat_p50_ns is None
    assert job.percentiles_of == "completion"
    assert (job.p50_ns, job.p99_ns, job.p999_ns) == (3588096, 18743296, 24772608)


def test_parse_randrw_two_jobs_global_options_and_bs_split() -> None:
    jobs = parse_fio_json(fixture("randrw-2jobs.json"))
    assert [(j.name, j.direction) for j in jobs] == [
        ("randrw-mixed", "read"), ("randrw-mixed", "write"), ("randrw-mixed", "read"), ("randrw-mixed", "write"),
    ]
    # Options came from "global options"; bs=4k,64k means reads 4 KiB and writes 64 KiB.
    assert {(j.rw, j.ioengine, j.direct) for j in jobs} == {("randrw", "psync", False)}
    assert [j.bs for j in jobs] == [4096, 65536, 4096, 65536]
    assert (jobs[0].bw_bytes, jobs[0].iops, jobs[0].total_ios) == (22360064, 5459.0, 5459)
    assert (jobs[3].bw_bytes, jobs[3].runtime_ms) == (157325682, 1001)
    assert jobs[3].iops == pytest.approx(2400.599401)
    assert jobs[1].lat_mean_ns == pytest.approx(38615.782333)
    assert jobs[2].clat_p99_ns == 1957888


def test_parse_skips_notes_printed_before_the_json() -> None:
    text = "note: both iodepth >= 1 and synchronous I/O engine are selected\n" + fixture("randread-4k-qd1.json")
    assert parse_fio_json(text) == parse_fio_json(fixture("randread-4k-qd1.json"))


@pytest.mark.parametrize("text", ["", "fio: engine libaio not loadable\n", '{\n  "jobs": [\n', '{"fio version": "x"}'])
def test_parse_rejects_output_that_is_not_fio_json(text: str) -> None:
    with pytest.raises(ProbeError, match="fio"):
        parse_fio_json(text)


def test_to_rows_one_row_per_direction_in_microseconds() -> None:
    jobs = parse_fio_json(fixture("randread-4k-qd1.json")) + parse_fio_json(fixture("write-1m-qd8.json"))
    result = StorageResult(directory="/nvme", fstype="ext4", mount_point="/", device="/dev/vda", direct=True,
                           direct_note="", fio_version="fio-3.33", ioengine="libaio", file_size=64 << 20,
                           runtime_s=1.0, ramp_s=0.25, quick=True, points=jobs)
    read, write = to_rows(result)
    assert read["rw"] == "randread" and read["bs"] == 4096 and read["iodepth"] == 1 and read["direct"] is True
    assert read["MB/s"] == pytest.approx(49.635)
    assert read["IOPS"] == pytest.approx(12116.9)
    assert read["lat_mean_us"] == pytest.approx(81.302)
    assert (read["lat_p50_us"], read["lat_p99_us"], read["percentiles_of"]) == (69.12, 195.584, "total")
    assert (write["lat_p50_us"], write["percentiles_of"], write["bs"]) == (3588.096, "completion", 1 << 20)
    assert {r["origin"] for r in (read, write)} == {"measured"}


# ---------------------------------------------------------------------------------------------- argv, mounts


def test_fio_argv_escapes_colons_and_omits_zero_ramp() -> None:
    argv = fio_argv("fio", Path("/mnt/a:b/t.dat"), JobSpec("randread", 4096, 32), ioengine="libaio",
                    direct=True, file_size=1 << 20, runtime_s=0.5, ramp_s=0.0)
    assert "--filename=/mnt/a\\:b/t.dat" in argv
    assert {"--rw=randread", "--bs=4096", "--iodepth=32", "--direct=1", "--runtime=500ms",
            "--output-format=json", "--time_based", "--group_reporting"} <= set(argv)
    assert not any(a.startswith("--ramp_time") for a in argv)


def test_mount_of_picks_longest_prefix_and_unescapes(tmp_path: Path) -> None:
    mounts = tmp_path / "mounts"
    mounts.write_text(
        "/dev/vda / ext4 rw 0 0\n"
        f"tmpfs {tmp_path}/my\\040disk tmpfs rw 0 0\n"
        f"tmpfs {tmp_path}/my tmpfs rw 0 0\n"
    )
    (tmp_path / "my disk" / "sub").mkdir(parents=True)
    info = mount_of(tmp_path / "my disk" / "sub", mounts=str(mounts))
    assert (info.mount_point, info.fstype) == (f"{tmp_path}/my disk", "tmpfs")
    assert mount_of(tmp_path, mounts=str(mounts)).mount_point == "/"


# ---------------------------------------------------------------------------------------------- errors


def test_missing_fio_binary_says_how_to_install(target: Path) -> None:
    with pytest.raises(ProbeError, match="apt-get install fio"):
        run_storage(target, quick=True, fio_bin=target / "no-such-fio")


def test_fio_not_on_path(target: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(target))
    with pytest.raises(ProbeError, match=r"bootstrap\.sh"):
        run_storage(target, quick=True)


def test_directory_that_does_not_exist_is_named(tmp_path: Path, fake_fio: Path) -> None:
    missing = tmp_path / "not-there"
    with pytest.raises(ProbeError, match=re.escape(f"{missing} does not exist")):
        run_storage(missing, quick=True, fio_bin=fake_fio)


def test_a_file_is_not_a_directory(tmp_path: Path, fake_fio: Path) -> None:
    with pytest.raises(ProbeError, match="not a directory"):
        run_storage(fake_fio, quick=True, fio_bin=fake_fio)


def test_unwritable_directory_is_named(fake_fio: Path) -> None:
    # sysfs refuses new files even for root, which chmod alone would not achieve.
    with pytest.raises(ProbeError, match="/sys is not writable"):
        run_storage(Path("/sys"), quick=True, fio_bin=fake_fio)


def test_fio_failure_carries_its_stderr_and_leaves_no_file(target: Path, fake_fio: Path) -> None:
    with pytest.raises(ProbeError, match=r"status 3.*pretend the device went away"):
        run_storage(target, quick=True, fio_bin=fake_fio, plan=TINY)
    assert list(target.iterdir()) == []


@needs_fio
def test_real_fio_rejecting_an_option(target: Path) -> None:
    bad = StoragePlan(jobs=(JobSpec("sideways", 4096, 1),), file_size=8 << 20, runtime_s=0.2, ramp_s=0)
    with pytest.raises(ProbeError, match="sideways"):
        run_storage(target, quick=True, plan=bad)
    assert list(target.iterdir()) == []


def test_ctrl_c_stops_fio_and_removes_the_test_file(tmp_path: Path, target: Path) -> None:
    pidfile = tmp_path / "fio.pid"
    script = tmp_path / "slow-fio"
    script.write_text(
        "#!/bin/sh\n"
        'case "$1" in --version) echo fio-3.33; exit 0;; --enghelp=*) exit 0;; esac\n'
        f'echo $$ > "{pidfile}"\n'
        "exec sleep 30\n"
    )
    script.chmod(0o755)

    def interrupt_soon(_msg: str) -> None:
        if "(1/" in _msg:
            threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()

    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        run_storage(target, quick=True, fio_bin=script, plan=TINY, progress=interrupt_soon)
    assert time.monotonic() - started < 10
    assert list(target.iterdir()) == []
    pid = int(pidfile.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # reaped, not left running or as a zombie


def test_direct_io_refused_is_reported_not_raised(target: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_open = os.open

    def no_direct(path: str, flags: int, mode: int = 0o777) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, mode)

    monkeypatch.setattr(storage.os, "open", no_direct)
    ok, why = storage.direct_io_supported(target)
    assert not ok and "EINVAL" in why and "buffered" in why
    assert list(target.iterdir()) == []


# ---------------------------------------------------------------------------------------------- real runs


@needs_fio
def test_real_run_gives_positive_figures_and_cleans_up(target: Path) -> None:
    messages: list[str] = []
    result = run_storage(target, quick=True, plan=TINY, progress=messages.append)
    assert list(target.iterdir()) == []
    assert [(p.rw, p.direction, p.bs, p.iodepth) for p in result.points] == [
        ("randread", "read", 4096, 1), ("write", "write", 65536, 4)]
    for p in result.points:
        assert p.bw_bytes > 0 and p.iops > 0 and p.lat_mean_ns > 0 and p.runtime_ms > 0
        assert p.percentiles_of == "total" and p.p99_ns is not None and p.p99_ns >= p.p50_ns > 0
        assert p.direct is result.direct
    assert result.fio_version.startswith("fio-")
    assert result.fstype and result.mount_point
    assert result.direct or result.direct_note
    assert any("(2/2)" in m for m in messages)
    assert len(to_rows(result)) == 2


@needs_fio
def test_buffered_fallback_says_so(target: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(storage, "direct_io_supported", lambda _d: (False, "the filesystem refuses O_DIRECT"))
    plan = StoragePlan(jobs=(JobSpec("read", 65536, 1),), file_size=8 << 20, runtime_s=0.2, ramp_s=0.0)
    result = run_storage(target, quick=True, plan=plan)
    assert result.direct is False
    assert [p.direct for p in result.points] == [False]
    assert any("refuses O_DIRECT" in n for n in result.notes)
    assert [r["direct"] for r in to_rows(result)] == [False]
