"""Running a command in the guest, with a fake QEMU that plays the guest's part on the host (no boot).

The fake reads the same command line real QEMU gets: it runs job.sh the way the guest init does, writes
to the two output pipes and the job folder, or hangs, crashes, refuses to start, or ignores SIGTERM.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from tieremu.vm import runner
from tieremu.vm.assets import GuestAssets, KernelInfo, is_static_elf
from tieremu.vm.initramfs import CpioEntry, init_script, write_newc
from tieremu.vm.runner import EXIT_CRASHED, EXIT_TIMEOUT, EXIT_UNAVAILABLE, Outcome, guest_env, run_in_guest
from tieremu.vm.topology import load_topology

REPO = Path(__file__).resolve().parents[1]
TOPOLOGY = REPO / "configs" / "vm" / "cxl-3node.yaml"

FAKE_QEMU = textwrap.dedent("""\
    import os, signal, subprocess, sys, time
    from urllib.parse import unquote

    args = sys.argv[1:]

    def opts(flag):
        return [args[i + 1] for i, a in enumerate(args) if a == flag]

    def chardev(ident):
        for c in opts("-chardev"):
            if f",id={ident}," in c:
                return c.split("path=", 1)[1].split(",append=")[0].replace(",,", ",")

    mode = os.environ["FAKE_QEMU_MODE"]
    with open(opts("-pidfile")[0], "w") as f:
        f.write(f"{os.getpid()}\\n")
    console = open(chardev("tieremu_console"), "a")
    if mode == "refuse":
        print("qemu-system-x86_64: -numa node: no such memdev", file=sys.stderr)
        sys.exit(1)
    if mode == "crash":
        console.write("Kernel panic - not syncing: VFS: Unable to mount root fs\\n")
        sys.exit(0)
    if mode in ("hang", "stubborn"):
        if mode == "stubborn":
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        child = subprocess.Popen(["sleep", "600"])
        with open(os.environ["FAKE_QEMU_CHILD"], "w") as f:
            f.write(f"{child.pid}\\n")
        os.write(int(chardev("tieremu_out").rsplit("/", 1)[1]), b"booting\\n")
        signal.pause()
    # mode == "guest": what the guest init does, on the host.
    run = unquote([a for a in opts("-append")[0].split() if a.startswith("tieremu.run=")][0][12:])
    jobdir = [f for f in opts("-fsdev") if "id=fs_job" in f][0].split("path=", 1)[1].split(",security")[0]
    console.write("tieremu-init: job start uptime=4.50\\n")
    console.flush()
    with open(chardev("tieremu_out"), "ab") as out, open(chardev("tieremu_err"), "ab") as err:
        rc = subprocess.run(["/bin/sh", "-c", open(run + "/job.sh").read()], stdin=subprocess.DEVNULL,
                            stdout=out, stderr=err).returncode
    console.write(f"tieremu-init: job end uptime=6.00 rc={rc}\\n")
    with open(jobdir + "/.tieremu-exit-code", "w") as f:
        f.write(f"{rc}\\n")
""")


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> GuestAssets:
    monkeypatch.setenv("TIEREMU_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("FAKE_QEMU_CHILD", str(tmp_path / "child.pid"))
    qemu = tmp_path / "fake-qemu"
    qemu.write_text(f"#!{sys.executable}\n" + FAKE_QEMU)
    qemu.chmod(0o755)
    kernel = KernelInfo("6.12.0-test-amd64", "linux-image-6.12.0-test-amd64", "6.12.0-1", "bookworm-backports",
                        False, tmp_path / "kernel")
    return GuestAssets(qemu, "7.2.0", Path("/bin/busybox"), kernel, tmp_path / "initramfs.cpio")


def _pids(result_rundir: Path, tmp_path: Path) -> list[int]:
    qemu_pid = int((result_rundir / "qemu.pid").read_text())
    child_pid = int((tmp_path / "child.pid").read_text())
    return [qemu_pid, child_pid]


def test_exit_code_output_env_and_job_folder(fake: GuestAssets, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_QEMU_MODE", "guest")
    monkeypatch.setenv("TIEREMU_SYSFS_ROOT", "/host/fixture")
    out, err = io.BytesIO(), io.BytesIO()
    jobdir = tmp_path / "job"
    script = ('echo "in_vm=$TIEREMU_IN_VM bytecode=$PYTHONDONTWRITEBYTECODE root=${TIEREMU_SYSFS_ROOT:-none} '
              'extra=$EXTRA pwd=$(pwd)"; echo oops >&2; echo result > "$TIEREMU_VM_JOBDIR/r.txt"; exit 7')
    result = run_in_guest(load_topology(TOPOLOGY), fake, ["sh", "-c", script], timeout=60, cwd=tmp_path,
                          env={"EXTRA": "x y"}, jobdir=jobdir, stdout=out, stderr=err)
    assert result.outcome is Outcome.EXITED
    assert result.exit_code == 7
    assert out.getvalue() == f"in_vm=1 bytecode=1 root=none extra=x y pwd={tmp_path}\n".encode()
    assert err.getvalue() == b"oops\n"
    assert (jobdir / "r.txt").read_text() == "result\n"
    assert not (jobdir / ".tieremu-exit-code").exists()
    assert (result.boot_seconds, result.command_seconds) == (4.5, 1.5)
    assert not result.kept and not result.rundir.exists()


def test_timeout_kills_qemu_and_its_children(fake: GuestAssets, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_QEMU_MODE", "hang")
    out = io.BytesIO()
    started = time.monotonic()
    result = run_in_guest(load_topology(TOPOLOGY), fake, ["sleep", "100"], timeout=2, stdout=out,
                          stderr=io.BytesIO())
    assert time.monotonic() - started < 2 + runner.KILL_GRACE_S + 5
    assert result.outcome is Outcome.TIMED_OUT
    assert result.exit_code == EXIT_TIMEOUT
    assert result.message.startswith("guest timed out after 2 s")
    assert out.getvalue() == b"booting\n"  # what came before the hang is not lost
    assert result.kept and (result.rundir / "qemu.argv").is_file()
    for pid in _pids(result.rundir, tmp_path):
        assert not runner._alive(pid), f"pid {pid} outlived the run"


def test_qemu_ignoring_sigterm_is_killed(fake: GuestAssets, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_QEMU_MODE", "stubborn")
    monkeypatch.setattr(runner, "KILL_GRACE_S", 0.5)
    result = run_in_guest(load_topology(TOPOLOGY), fake, ["true"], timeout=2, stdout=io.BytesIO(),
                          stderr=io.BytesIO())
    assert result.exit_code == EXIT_TIMEOUT
    for pid in _pids(result.rundir, tmp_path):
        assert not runner._alive(pid)


def test_guest_without_exit_code_is_a_crash(fake: GuestAssets, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_QEMU_MODE", "crash")
    result = run_in_guest(load_topology(TOPOLOGY), fake, ["true"], timeout=30, stdout=io.BytesIO(),
                          stderr=io.BytesIO())
    assert result.outcome is Outcome.CRASHED
    assert result.exit_code == EXIT_CRASHED
    assert result.message == "guest crashed (no exit code written)"
    assert "Kernel panic" in (result.rundir / "console.log").read_text()


def test_qemu_refusing_to_start_is_reported_with_its_reason(fake: GuestAssets,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_QEMU_MODE", "refuse")
    result = run_in_guest(load_topology(TOPOLOGY), fake, ["true"], timeout=30, stdout=io.BytesIO(),
                          stderr=io.BytesIO())
    assert result.outcome is Outcome.FAILED_TO_START
    assert result.exit_code == EXIT_UNAVAILABLE
    assert "no such memdev" in result.message


RUN_ONE = textwrap.dedent("""\
    import sys
    from pathlib import Path
    from tieremu.vm.assets import GuestAssets, KernelInfo
    from tieremu.vm.runner import run_in_guest
    from tieremu.vm.topology import load_topology
    tmp = Path(sys.argv[1])
    kernel = KernelInfo("6.12.0-t", "p", "1", "s", False, tmp / "kernel")
    assets = GuestAssets(tmp / "fake-qemu", "7.2.0", Path("/bin/busybox"), kernel, tmp / "i.cpio")
    r = run_in_guest(load_topology(sys.argv[2]), assets, ["true"], timeout=300)
    print(r.message, file=sys.stderr)
    sys.exit(r.exit_code)
""")


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_to_the_runner_kills_the_guest(fake: GuestAssets, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              sig: signal.Signals, code: int) -> None:
    monkeypatch.setenv("FAKE_QEMU_MODE", "hang")
    proc = subprocess.Popen([sys.executable, "-c", RUN_ONE, str(tmp_path), str(TOPOLOGY)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # The fake writes its child's pid after its own pidfile: then both exist to be killed.
    deadline = time.monotonic() + 30
    while not (tmp_path / "child.pid").is_file() or not (tmp_path / "child.pid").read_text().endswith("\n"):
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    pidfiles = list((tmp_path / "cache" / "vm" / "runs").glob("*/qemu.pid"))
    assert len(pidfiles) == 1
    pids = [int(pidfiles[0].read_text()), int((tmp_path / "child.pid").read_text())]
    assert all(runner._alive(p) for p in pids)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == code, err
    assert f"interrupted by {sig.name}" in err.decode()
    for pid in pids:
        assert not runner._alive(pid), f"pid {pid} outlived the run"


def test_guest_env_is_explicit(fake: GuestAssets) -> None:
    topo = load_topology(TOPOLOGY)
    env = guest_env(topo, fake, Path("/j"), {"A": "1"},
                    host_env={"PATH": "/p", "CI": "true", "HOSTNAME": "h", "TIEREMU_SYSFS_ROOT": "/fx",
                              "TIEREMU_DEBUG": "1", "VIRTUAL_ENV": "/v"})
    assert env["PATH"] == "/p" and env["CI"] == "true" and env["TIEREMU_DEBUG"] == "1" and env["A"] == "1"
    assert "HOSTNAME" not in env and "TIEREMU_SYSFS_ROOT" not in env and "VIRTUAL_ENV" not in env
    assert env["TIEREMU_IN_VM"] == "1" and env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["TIEREMU_VM_JOBDIR"] == "/j" and env["TIEREMU_VM_HMAT_TIERS"] == "1"
    assert env["TIEREMU_VM_TOPOLOGY"] == str(TOPOLOGY)


def test_cli_reports_missing_qemu_with_exit_69(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from tieremu.cli import main

    monkeypatch.setenv("TIEREMU_VM_QEMU", str(tmp_path / "no-such-qemu"))
    monkeypatch.setenv("TIEREMU_CACHE_DIR", str(tmp_path))
    result = CliRunner().invoke(main, ["vm", "run", "--", "true"])
    assert result.exit_code == EXIT_UNAVAILABLE
    assert "QEMU cannot start here: QEMU not found" in result.output
    result = CliRunner().invoke(main, ["vm", "prepare"])
    assert result.exit_code == EXIT_UNAVAILABLE


@pytest.mark.parametrize("args", [["vm"], ["vm", "run"], ["vm", "prepare"]])
def test_every_vm_command_has_help(args: list[str]) -> None:
    from tieremu.cli import main

    result = CliRunner().invoke(main, [*args, "--help"])
    assert result.exit_code == 0
    description = result.output.split("\n\n")[1].strip()
    assert len(description) > 40, result.output


BUSYBOX = Path("/bin/busybox")
needs_busybox = pytest.mark.skipif(not BUSYBOX.is_file(), reason="busybox-static not installed "
                                   "(bash scripts/bootstrap.sh installs it)")


@needs_busybox
def test_init_script_parses_in_busybox_sh(tmp_path: Path) -> None:
    (tmp_path / "init").write_text(init_script())
    proc = subprocess.run([str(BUSYBOX), "sh", "-n", str(tmp_path / "init")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "@" not in init_script().replace("$@", "")  # every placeholder filled


@needs_busybox
def test_newc_archive_reads_back_with_busybox_cpio(tmp_path: Path) -> None:
    archive = tmp_path / "a.cpio"
    write_newc([CpioEntry("bin", 0o040755), CpioEntry("bin/hello", 0o100755, b"#!/bin/sh\necho hi\n"),
                CpioEntry("odd", 0o100644, b"x" * 5), CpioEntry("dev/console", 0o020600, rdev=(5, 1))], archive)
    listing = subprocess.run([str(BUSYBOX), "cpio", "-tv"], stdin=archive.open("rb"), capture_output=True, text=True)
    assert listing.returncode == 0, listing.stderr
    names = [line.split()[-1] for line in listing.stdout.splitlines()]
    assert names == ["bin", "bin/hello", "odd", "dev/console"]
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run([str(BUSYBOX), "cpio", "-id", "bin/hello", "odd"], stdin=archive.open("rb"), cwd=out, check=True,
                   capture_output=True)
    assert (out / "bin" / "hello").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert os.access(out / "bin" / "hello", os.X_OK)
    assert (out / "odd").read_bytes() == b"xxxxx"


@needs_busybox
def test_static_busybox_is_told_from_a_dynamic_binary() -> None:
    assert is_static_elf(BUSYBOX)
    assert not is_static_elf(Path("/bin/sh").resolve())


def test_kept_run_folders_are_pruned_after_a_day(fake: GuestAssets, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_QEMU_MODE", "crash")
    runs = tmp_path / "cache" / "vm" / "runs"
    old, recent = runs / "cxl-3node-old", runs / "cxl-3node-recent"
    for d in (old, recent):
        d.mkdir(parents=True)
    two_days_ago = time.time() - 2 * 24 * 3600
    os.utime(old, (two_days_ago, two_days_ago))
    result = run_in_guest(load_topology(TOPOLOGY), fake, ["true"], timeout=30, stdout=io.BytesIO(),
                          stderr=io.BytesIO())
    assert not old.exists()
    assert recent.is_dir() and result.rundir.is_dir()
