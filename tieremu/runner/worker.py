"""One run in a fresh process, the way pyperf isolates its runs: a new interpreter per run (multiprocessing's
"spawn" context), so one run's memory state (allocations, page placement, caches, emulation debts) cannot leak
into the next. A run that raises, exits or is killed by a signal comes back as a failure with the reason;
the parent carries on.

Runs whose figures are accounting only (simulate-mode trace replays and their bounds: no memory placed, no time
measured) have nothing to leak into a timing and would spend most of their wall time starting an interpreter; they
run one after another in a warm worker (`WarmWorker`): still a separate process from the runner, still killed with
its parent (PDEATHSIG), its output still in each run's own worker.log, replaced after a crash or a timeout. Each
run's status.json and the manifest's run list say which kind of process ran it (`worker: fresh | warm`).
"""

from __future__ import annotations

import contextlib
import ctypes
import faulthandler
import multiprocessing
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from tieremu.record.row import MetricRow
from tieremu.runner.jobs import RunContext, load_job
from tieremu.runner.kernel_baseline import run_environment
from tieremu.safefile import open_append

LOG_NAME = "worker.log"  # the child's stdout and stderr (and faulthandler's dump on a crash)
LOG_TAIL = 2000  # characters of that log quoted in a crash's error
PR_SET_PDEATHSIG = 1  # linux/prctl.h
FRESH, WARM = "fresh", "warm"  # the worker a run gets (recorded in its status.json and the manifest)
# Phases of a run as the progress display names them: the worker starting, the job running, the rows being written.
STARTING, RUNNING, WRITING = "start-up", "running", "writing"

PhaseCallback = Callable[[str], None]


def worker_kind(kind: str, params: Any) -> str:
    """`warm` for the runs that need no fresh process: simulate-mode replays (accounting only; their bounds are the
    same job). Everything that places memory or measures time (execute, decode, engine, probe, roundtrip, a job of
    your own) gets a fresh one."""
    return WARM if kind == "replay" and getattr(params, "mode", None) == "simulate" else FRESH


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


def run_isolated(task: RunTask, timeout_s: float, on_phase: PhaseCallback | None = None) -> RunOutcome:
    """Run the task's job in a new process; wait at most timeout_s, then kill it. `on_phase` hears `running` when
    the job starts (the time before is the interpreter's start-up)."""
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
        message, timed_out = _receive(receiver, start + timeout_s, on_phase)
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


def _receive(receiver: Connection, deadline: float,
             on_phase: PhaseCallback | None = None) -> tuple[tuple[str, Any] | None, bool]:
    """The child's result message (phase messages before it go to `on_phase`), or None if it died first (EOF) or
    the deadline (perf_counter) passed (then True)."""
    while True:
        if not receiver.poll(max(0.0, deadline - time.perf_counter())):
            return None, True
        try:
            message = receiver.recv()
        except (EOFError, OSError):
            return None, False
        if message[0] != "phase":
            return message, False
        if on_phase is not None:
            on_phase(message[1])


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
    sender.send(_run_job(task, sender))
    sender.close()


def _run_job(task: RunTask, conn: Connection) -> tuple[str, Any]:
    """The job's rows as ("ok", rows), or ("error", traceback): what the worker sends back."""
    try:
        job = load_job(task.job_path)
        conn.send(("phase", RUNNING))
        with run_environment(task.context.policy):  # e.g. the kernel's tiering knobs for policy `kernel`
            rows = job.run(task.params, task.context)
        bad = [r for r in rows if not isinstance(r, MetricRow)]
        if bad:
            raise TypeError(f"job {task.job_path} returned {type(bad[0]).__name__} rows; expected MetricRow")
        return ("ok", rows)
    except BaseException:  # any failure of the job, even SystemExit, is the run's result: reported to the parent
        return ("error", traceback.format_exc())


class WarmWorker:
    """One worker process kept between runs that need no fresh interpreter (`worker_kind` says which): started on
    first use, given one run at a time, replaced when a run kills it or runs out of time. Use as a context manager:
    closing it ends the process (and PDEATHSIG ends it if the runner dies first)."""

    def __init__(self) -> None:
        self._proc: Any = None
        self._conn: Connection | None = None

    def __enter__(self) -> WarmWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(self, task: RunTask, timeout_s: float, on_phase: PhaseCallback | None = None) -> RunOutcome:
        task.context.workdir.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        if self._proc is None or not self._proc.is_alive():
            self._start()
        assert self._conn is not None
        message, timed_out, exitcode = None, False, None
        try:
            self._conn.send(task)
            message, timed_out = _receive(self._conn, start + timeout_s, on_phase)
        except (BrokenPipeError, EOFError, OSError):
            message = None
        finally:
            if message is None:  # dead, hung past its time, or interrupted (Ctrl-C): the next run gets a new one
                exitcode = self._stop(kill=True)
        seconds = time.perf_counter() - start
        if message is not None:
            return RunOutcome(message[1] if message[0] == "ok" else [], None if message[0] == "ok" else message[1],
                              seconds, None)
        reason = f"timed out after {timeout_s:g} s and was killed" if timed_out else _death(exitcode)
        return RunOutcome([], f"{reason} (warm worker){_log_tail(task.context.workdir)}", seconds, exitcode)

    def close(self) -> None:
        if self._proc is not None:
            self._stop(kill=False)

    def _start(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe(duplex=True)
        self._proc = ctx.Process(target=_warm_child, args=(child, os.getpid()), name="tieremu-warm-worker")
        self._proc.start()
        child.close()

    def _stop(self, *, kill: bool) -> int | None:
        proc, conn = self._proc, self._conn
        self._proc = self._conn = None
        if conn is not None:
            if not kill:
                with contextlib.suppress(OSError, ValueError):
                    conn.send(None)  # asks the loop to end
            conn.close()
        if kill and proc.is_alive():
            proc.kill()
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join()
        return proc.exitcode


def _warm_child(conn: Connection, parent: int) -> None:
    """The warm worker's loop: one task at a time, its output into that run's worker.log, until told to end."""
    die_with_parent(parent)
    devnull = os.open(os.devnull, os.O_WRONLY)
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        log = open_append(task.context.workdir / LOG_NAME)
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        faulthandler.enable(file=log)
        message = _run_job(task, conn)
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(devnull, 1)  # between runs, nothing lands in a finished run's log
        os.dup2(devnull, 2)
        faulthandler.enable(file=sys.__stderr__)
        log.close()
        conn.send(message)
