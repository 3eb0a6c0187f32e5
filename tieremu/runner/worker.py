"""One run in a fresh process, the way pyperf isolates its runs: a new interpreter per run (multiprocessing's
"spawn" context), so one run's memory state (allocations, page placement, caches, emulation debts) cannot leak
into the next. A run that raises, exits or is killed by a signal comes back as a failure with the reason;
the parent carries on.
"""

from __future__ import annotations

import ctypes
import faulthandler
import multiprocessing
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from types import FrameType
from typing import Any

from tieremu.record.row import MetricRow
from tieremu.runner.jobs import RunContext, load_job
from tieremu.runner.kernel_baseline import run_environment
from tieremu.safefile import open_append

LOG_NAME = "worker.log"  # the child's stdout and stderr (and faulthandler's dump on a crash)
LOG_TAIL = 2000  # characters of that log quoted in a crash's error
PR_SET_PDEATHSIG = 1  # linux/prctl.h


@dataclass(frozen=True)
class RunTask:
    job_path: str  # module:Class, imported in the child
    params: Any
    context: RunContext


@dataclass(frozen=True)
class RunOutcome:
    rows: list[MetricRow]
    error: str | None  # None: the run finished; else why not (traceback, exit code, signal, timeout)
    seconds: float
    exitcode: int | None

    @property
    def ok(self) -> bool:
        return self.error is None


def run_isolated(task: RunTask, timeout_s: float) -> RunOutcome:
    """Run the task's job in a new process; wait at most timeout_s, then kill it."""
    ctx = multiprocessing.get_context("spawn")
    receiver, sender = ctx.Pipe(duplex=False)
    task.context.workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    # Not a daemon: a job may start processes of its own, which daemonic processes may not.
    proc = ctx.Process(target=_child, args=(sender, task, os.getpid()), name=f"tieremu-run-{task.context.run_id}")
    proc.start()
    sender.close()  # only the child holds the sending end now, so its death reads as EOF here
    message, timed_out = None, False
    try:
        message, timed_out = _receive(receiver, timeout_s)
    finally:  # also on Ctrl-C: no run outlives the sweep
        receiver.close()
        if message is None and proc.is_alive():
            proc.kill()
        proc.join(10)
        if proc.is_alive():  # sent its result but will not exit (a stray non-daemon thread): no run outlives itself
            proc.kill()
            proc.join()
    seconds = time.perf_counter() - start
    if message is not None and message[0] == "ok":
        return RunOutcome(message[1], None, seconds, proc.exitcode)
    if message is not None:
        return RunOutcome([], message[1], seconds, proc.exitcode)
    reason = f"timed out after {timeout_s:g} s and was killed" if timed_out else _death(proc.exitcode)
    return RunOutcome([], f"{reason}{_log_tail(task.context.workdir)}", seconds, proc.exitcode)


def headline(error: str | None) -> str:
    """The line of a run's error that says what happened: a traceback's last line, a process death's first."""
    lines = [line for line in (error or "").strip().splitlines() if line.strip()]
    if not lines:
        return ""
    return lines[0] if lines[0].startswith(("the worker process", "timed out")) else lines[-1]


def _receive(receiver: Connection, timeout_s: float) -> tuple[tuple[str, Any] | None, bool]:
    """The child's one message, or None if it died first (EOF) or the time ran out (then True)."""
    if not receiver.poll(timeout_s):
        return None, True
    try:
        return receiver.recv(), False
    except (EOFError, OSError):
        return None, False


def _death(exitcode: int | None) -> str:
    if exitcode is None:
        return "the worker process did not end"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"the worker process was killed by {name} (exit code {exitcode})"
    return f"the worker process exited with code {exitcode} before returning a result"


def _log_tail(workdir: Path) -> str:
    try:
        text = (workdir / LOG_NAME).read_text(errors="replace").strip()
    except OSError:
        return ""
    return f"\n--- worker output (last {LOG_TAIL} characters) ---\n{text[-LOG_TAIL:]}" if text else ""


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP reached the runner: handled like Ctrl-C (the running worker is killed, the result folder
    is marked failed and can be resumed)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"{signal.Signals(signum).name} received")
        self.signum = signum

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name


@contextmanager
def terminate_raises() -> Iterator[None]:
    """While a sweep runs, SIGTERM and SIGHUP (a closed terminal or ssh session) raise Terminated."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        raise Terminated(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def die_with_parent(parent: int) -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (prctl PR_SET_PDEATHSIG), so no worker
    outlives a runner killed with SIGKILL; if the parent is already gone, exit now."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG): {os.strerror(err)}")
    if os.getppid() != parent:  # the parent died before the prctl: the signal will never come
        os._exit(1)


def _child(sender: Connection, task: RunTask, parent: int) -> None:
    """Runs in the fresh process: output to the run's log, a traceback dump on fatal signals, one message back."""
    die_with_parent(parent)
    log = open_append(task.context.workdir / LOG_NAME)  # lives as long as the process
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    faulthandler.enable(file=log)
    try:
        job = load_job(task.job_path)
        with run_environment(task.context.policy):  # e.g. the kernel's tiering knobs for policy `kernel`
            rows = job.run(task.params, task.context)
        bad = [r for r in rows if not isinstance(r, MetricRow)]
        if bad:
            raise TypeError(f"job {task.job_path} returned {type(bad[0]).__name__} rows; expected MetricRow")
        message: tuple[str, Any] = ("ok", rows)
    except BaseException:  # any failure of the job, even SystemExit, is the run's result: reported to the parent
        message = ("error", traceback.format_exc())
    sender.send(message)
    sender.close()
