"""Boot the guest, run one command inside, stream its output live and return its exit code.

QEMU runs in a session (and process group) of its own, so a terminal's Ctrl-C reaches only this process,
which then ends QEMU by its PID; every path out of `run_in_guest` (exit, timeout, crash, Ctrl-C, SIGTERM,
an exception) kills and reaps QEMU before returning. PR_SET_PDEATHSIG covers the one path that runs no
Python code: this process being SIGKILLed.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import os
import re
import selectors
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from tieremu.vm.assets import GuestAssets, cache_dir
from tieremu.vm.initramfs import EXIT_CODE_FILE
from tieremu.vm.qemu import GuestPlumbing, build_argv
from tieremu.vm.topology import VmTopology

EXIT_UNAVAILABLE = 69  # sysexits' EX_UNAVAILABLE: QEMU or what it boots is missing or would not start
EXIT_TIMEOUT = 124  # as timeout(1)
EXIT_CRASHED = 125
KILL_GRACE_S = 3.0
# Host variables that keep their meaning inside the guest; everything else is left behind.
PASS_ENV = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "CI", "NO_COLOR", "FORCE_COLOR", "COLUMNS")
# A fixture sysfs root of the host must not hide the guest's real one.
BLOCK_ENV = ("TIEREMU_SYSFS_ROOT",)
PR_SET_PDEATHSIG = 1
# Failed runs keep their folder for a look at the console log; a day later they are only clutter.
KEEP_RUNS_S = 24 * 3600


class Outcome(enum.Enum):
    EXITED = "exited"
    TIMED_OUT = "timed out"
    CRASHED = "crashed"
    FAILED_TO_START = "failed to start"
    INTERRUPTED = "interrupted"


@dataclass(frozen=True)
class RunResult:
    exit_code: int  # the command's own, or one of EXIT_* / 128+signal
    outcome: Outcome
    message: str  # empty when the command exited; else why there is no command exit code
    seconds: float  # QEMU start to QEMU exit: boot to poweroff
    boot_seconds: float | None  # guest clock: kernel start to the command's start
    command_seconds: float | None  # guest clock: the command's start to its end
    rundir: Path
    jobdir: Path
    kept: bool  # whether rundir is left on disk (failures, or asked to)


class _Signalled(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def guest_env(topology: VmTopology, assets: GuestAssets, jobdir: Path, extra: Mapping[str, str],
              host_env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The command's complete environment inside the guest."""
    host = os.environ if host_env is None else host_env
    env = {k: host[k] for k in PASS_ENV if k in host}
    env |= {k: v for k, v in host.items() if k.startswith("TIEREMU_") and k not in BLOCK_ENV}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    env.setdefault("LANG", "C.UTF-8")
    env |= {
        # The host's home is read-only in the guest; tools that write caches under ~ need a writable one.
        "HOME": "/tmp/home",
        "TMPDIR": "/tmp",
        "TERM": "dumb",
        "TIEREMU_IN_VM": "1",
        "TIEREMU_VM_JOBDIR": str(jobdir),
        "TIEREMU_VM_NAME": topology.name,
        "TIEREMU_VM_KERNEL": assets.kernel.release,
        "TIEREMU_VM_KERNEL_SUITE": assets.kernel.suite,
        "TIEREMU_VM_HMAT_TIERS": "1" if assets.kernel.hmat_memory_tiers else "0",
        "PYTHONDONTWRITEBYTECODE": "1",  # the tree is read-only inside
        "PYTHONUNBUFFERED": "1",  # output is a pipe inside: without this Python holds it back
    }
    if topology.source is not None:
        env["TIEREMU_VM_TOPOLOGY"] = str(Path(topology.source).resolve())
    env |= dict(extra)
    return env


def job_script(command: Sequence[str], cwd: Path, env: Mapping[str, str]) -> str:
    if not command:
        raise ValueError("no command to run in the guest")
    if "=" in command[0]:
        raise ValueError(f"command {command[0]!r}: a first word with '=' would be read as a variable by env")
    assigns = " ".join(shlex.quote(f"{k}={v}") for k, v in sorted(env.items()))
    return "\n".join([
        "# Written by tieremu vm run: the command, its folder and its whole environment.",
        f"mkdir -p {shlex.quote(env.get('HOME', '/tmp/home'))}",
        f"cd {shlex.quote(str(cwd))} || exit 126",
        f"exec env -i {assigns} {shlex.join(command)}",
        "",
    ])


def _set_pdeathsig() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    """SIGTERM and SIGHUP raise, like SIGINT does, so the cleanup in `finally` runs for them too."""

    def handler(signum: int, _frame: object) -> None:
        raise _Signalled(signum)

    old = {}
    try:
        for sig in (signal.SIGTERM, signal.SIGHUP):
            old[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread: signals are the main thread's business
        pass
    try:
        yield
    finally:
        for sig, previous in old.items():
            signal.signal(sig, previous)


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, process group) of a process, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[2])


def _alive(pid: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def _group_members(pgid: int) -> list[int]:
    """Live processes in process group `pgid` (zombies are dead enough: they hold no memory)."""
    members = []
    for entry in os.listdir("/proc"):
        stat = _stat(int(entry)) if entry.isdigit() else None
        if stat is not None and stat[1] == pgid and stat[0] not in ("Z", "X"):
            members.append(int(entry))
    return members


def kill_guest(proc: subprocess.Popen[bytes], pidfile: Path) -> None:
    """End QEMU (its process group, and the PID it wrote if that differs) and reap it.

    Returns once nothing of the group is left: a process QEMU started must not outlive the run either.
    """
    pids = {proc.pid}
    with contextlib.suppress(OSError, ValueError):
        pids.add(int(pidfile.read_text().split()[0]))
    for sig, grace in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, 30.0)):
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)
        for pid in pids - {proc.pid}:
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
        if not any(_alive(p) for p in pids - {proc.pid}):
            break
    deadline = time.monotonic() + 30.0
    while (left := _group_members(proc.pid)) and time.monotonic() < deadline:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        # A SIGKILLed process needs the scheduler to run its exit; poll for that briefly.
        time.sleep(0.02)
    if left:
        raise RuntimeError(f"processes {left} of the guest's process group survived SIGKILL")


def _sink(stream: BinaryIO) -> Callable[[bytes], None]:
    broken = False

    def write(data: bytes) -> None:
        nonlocal broken
        if broken:
            return
        try:
            stream.write(data)
            stream.flush()
        except BrokenPipeError:
            broken = True  # a reader like `head` went away; the guest still runs to its end

    return write


def _guest_times(console: str) -> tuple[float | None, float | None]:
    start = re.search(r"tieremu-init: job start uptime=([\d.]+)", console)
    end = re.search(r"tieremu-init: job end uptime=([\d.]+)", console)
    boot = float(start.group(1)) if start else None
    command = float(end.group(1)) - boot if end and boot is not None else None
    return boot, command


def _read_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def run_in_guest(
    topology: VmTopology,
    assets: GuestAssets,
    command: Sequence[str],
    *,
    timeout: float,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    jobdir: Path | None = None,
    keep: bool = False,
    accel: str = "tcg",
    stdout: BinaryIO | None = None,
    stderr: BinaryIO | None = None,
) -> RunResult:
    """Boot `topology`, run `command` in `cwd` (default: this process's) and return how it ended.

    The guest writes only into `jobdir` (default: a fresh folder, removed with the run's folder afterwards
    unless `keep`); the command finds its path in TIEREMU_VM_JOBDIR.
    """
    runs = cache_dir() / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    _prune_runs(runs, KEEP_RUNS_S)
    rundir = Path(tempfile.mkdtemp(prefix=f"{topology.name}-", dir=runs))
    jobdir = (rundir / "job") if jobdir is None else jobdir.resolve()
    jobdir.mkdir(parents=True, exist_ok=True)
    exit_file = jobdir / EXIT_CODE_FILE
    exit_file.unlink(missing_ok=True)
    cwd = (cwd or Path.cwd()).resolve()
    script_env = guest_env(topology, assets, jobdir, env or {})
    (rundir / "job.sh").write_text(job_script(command, cwd, script_env))
    (rundir / "guest.env").write_text(f"TIEREMU_JOBDIR={shlex.quote(str(jobdir))}\n"
                                      f"TIEREMU_CWD={shlex.quote(str(cwd))}\n")
    out_sink = _sink(stdout or sys.stdout.buffer)
    err_sink = _sink(stderr or sys.stderr.buffer)

    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    plumbing = GuestPlumbing(assets.qemu, assets.kernel.vmlinuz, assets.initramfs, rundir, jobdir, out_w, err_w)
    argv = build_argv(topology, plumbing, accel)
    (rundir / "qemu.argv").write_text(shlex.join(argv) + "\n")
    diag = bytearray()
    outcome: Outcome | None = None
    interrupted_by = 0
    started = time.monotonic()
    proc: subprocess.Popen[bytes] | None = None
    with _signals_raise():
        try:
            try:
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, pass_fds=(out_w, err_w),
                                        start_new_session=True, preexec_fn=_set_pdeathsig)
            except OSError as exc:
                outcome = Outcome.FAILED_TO_START
                diag += f"cannot execute {assets.qemu}: {exc.strerror}\n".encode()
            finally:
                os.close(out_w)
                os.close(err_w)
            if proc is not None:
                assert proc.stdout is not None
                streams: dict[int, Callable[[bytes], None]] = {out_r: out_sink, err_r: err_sink,
                                                               proc.stdout.fileno(): diag.extend}
                if not _pump(streams, started + timeout):
                    outcome = Outcome.TIMED_OUT
                else:
                    try:
                        proc.wait(timeout=max(0.0, started + timeout - time.monotonic()))
                    except subprocess.TimeoutExpired:
                        outcome = Outcome.TIMED_OUT
        except KeyboardInterrupt:
            outcome, interrupted_by = Outcome.INTERRUPTED, signal.SIGINT
        except _Signalled as exc:
            outcome, interrupted_by = Outcome.INTERRUPTED, exc.signum
        finally:
            if proc is not None:
                kill_guest(proc, plumbing.pidfile)
                # What the guest wrote before it was killed is still in the pipes.
                _drain({out_r: out_sink, err_r: err_sink}
                       | ({proc.stdout.fileno(): diag.extend} if proc.stdout is not None else {}))
                if proc.stdout is not None:
                    proc.stdout.close()
            os.close(out_r)
            os.close(err_r)
    seconds = time.monotonic() - started
    (rundir / "qemu.log").write_bytes(bytes(diag))
    console = _read_text(plumbing.console_log)
    boot_s, command_s = _guest_times(console)

    code_text = _read_text(exit_file).strip()
    if outcome is None and re.fullmatch(r"\d+", code_text):
        exit_code, message, outcome = int(code_text), "", Outcome.EXITED
    elif outcome is Outcome.INTERRUPTED:
        name = signal.Signals(interrupted_by).name
        exit_code, message = 128 + interrupted_by, f"interrupted by {name}; guest killed"
    elif outcome is Outcome.TIMED_OUT:
        exit_code, message = EXIT_TIMEOUT, f"guest timed out after {timeout:g} s; QEMU killed"
    elif outcome is Outcome.FAILED_TO_START or (proc is not None and proc.returncode != 0 and not console):
        outcome = Outcome.FAILED_TO_START
        exit_code = EXIT_UNAVAILABLE
        message = f"QEMU could not start the guest: {diag.decode(errors='replace').strip() or 'no message'}"
    else:
        outcome = Outcome.CRASHED
        exit_code, message = EXIT_CRASHED, "guest crashed (no exit code written)"
    exit_file.unlink(missing_ok=True)
    kept = keep or outcome is not Outcome.EXITED
    if not kept:
        shutil.rmtree(rundir, ignore_errors=True)
    return RunResult(exit_code, outcome, message, seconds, boot_s, command_s, rundir, jobdir, kept)


def _pump(streams: dict[int, Callable[[bytes], None]], deadline: float) -> bool:
    """Forward every stream until all reach end of file (True) or the deadline passes (False)."""
    with selectors.DefaultSelector() as sel:
        for fd in streams:
            sel.register(fd, selectors.EVENT_READ)
        while sel.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            for key, _ in sel.select(remaining):
                data = os.read(key.fd, 65536)
                if data:
                    streams[key.fd](data)
                else:
                    sel.unregister(key.fd)
    return True


def _drain(streams: dict[int, Callable[[bytes], None]]) -> None:
    """Forward what is left in the pipes without waiting for writers that may never close them."""
    for fd, sink in streams.items():
        os.set_blocking(fd, False)
        with contextlib.suppress(BlockingIOError, OSError):
            while data := os.read(fd, 65536):
                sink(data)


def _prune_runs(runs: Path, max_age_s: float) -> None:
    now = time.time()
    for entry in runs.iterdir():
        with contextlib.suppress(OSError):
            if entry.is_dir() and now - entry.stat().st_mtime > max_age_s:
                shutil.rmtree(entry, ignore_errors=True)
