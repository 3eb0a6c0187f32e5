"""`tieremu vm`: run commands inside the multi-node QEMU guest, and prepare what it boots."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from tieremu.cli.replay import Number
from tieremu.numbers import MAX_SECONDS
from tieremu.vm import assets as vm_assets
from tieremu.vm.errors import VmUnavailable
from tieremu.vm.qemu import ACCELS
from tieremu.vm.runner import EXIT_UNAVAILABLE, Outcome, RunResult, run_in_guest
from tieremu.vm.topology import load_topology

DEFAULT_TOPOLOGY = vm_assets.REPO_ROOT / "configs" / "vm" / "cxl-3node.yaml"
ACCEL_ENV = "TIEREMU_VM_ACCEL"
CONSOLE_TAIL_LINES = 25


def _say(message: str) -> None:
    click.echo(f"tieremu vm: {message}", err=True)


def _unavailable(exc: VmUnavailable) -> None:
    _say(f"QEMU cannot start here: {exc}")
    sys.exit(EXIT_UNAVAILABLE)


@click.group(name="vm")
def vm() -> None:
    """Run commands inside a multi-node QEMU guest with real kernel NUMA.

    The guest has CPU-less memory nodes, SLIT distances and HMAT latencies and bandwidths as a topology
    file describes (configs/vm/*.yaml); its kernel builds NUMA nodes and memory tiers from them, so
    binding, page migration, tiers and demotion behave as on a multi-socket or CXL server. Speeds inside
    are emulation artefacts (QEMU TCG), never performance results.
    """


@vm.command()
@click.option("--kernel", "choice", type=click.Choice(vm_assets.KERNEL_CHOICES), default="auto", show_default=True,
              help="Which Debian kernel the guest boots: the backports one (6.12, builds memory tiers from "
                   "HMAT), the distribution's (6.1: nodes and HMAT, but one memory tier), or auto: backports, "
                   "else the distribution's.")
@click.option("--refresh", is_flag=True, help="Ask the archive for a newer kernel even when one is cached.")
def prepare(choice: str, refresh: bool) -> None:
    """Fetch and cache what the guest boots, and say what was done.

    Finds QEMU and busybox-static (installed by scripts/bootstrap.sh), downloads the kernel package from
    the machine's own Debian archive with a private apt state (the host's apt setup is not changed),
    extracts it and builds the initramfs, all under .cache/vm/ (or $TIEREMU_CACHE_DIR/vm). A second run
    finds everything cached and does nothing.
    """
    try:
        report = vm_assets.prepare(choice, refresh)
    except VmUnavailable as exc:
        _unavailable(exc)
        return
    for action in report.actions:
        click.echo(f"prepare: {action}")
    if not report.actions:
        click.echo("prepare: cached, nothing to do")
    for note in report.notes:
        click.echo(f"prepare: NOTE: {note}")
    a = report.assets
    tiers = "memory tiers from HMAT" if a.kernel.hmat_memory_tiers else "no memory tiers from HMAT"
    click.echo(f"prepare: guest kernel {a.kernel.release} from {a.kernel.suite} ({tiers}); QEMU {a.qemu_version} "
               f"({a.qemu}); busybox {a.busybox}; cache {vm_assets.cache_dir()}")


def _env_pairs(values: tuple[str, ...]) -> dict[str, str]:
    env = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r}: expected KEY=VALUE", param_hint="--env")
        env[key] = value
    return env


@vm.command(context_settings={"allow_interspersed_args": False})
@click.option("--topology", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=DEFAULT_TOPOLOGY,
              show_default="configs/vm/cxl-3node.yaml", help="Guest layout: nodes, memory, vCPUs, SLIT, HMAT.")
@click.option("--timeout", type=Number(1, MAX_SECONDS, lo_open=False), default=600.0, show_default=True,
              help="Seconds from QEMU start to poweroff; past them the guest is killed (exit 124).")
@click.option("--jobdir", type=click.Path(file_okay=False, path_type=Path),
              help="The folder the guest may write (TIEREMU_VM_JOBDIR inside); kept afterwards. Default: a "
                   "fresh folder, removed after a run that exits.")
@click.option("--keep", is_flag=True, help="Keep the run folder (console log, QEMU command line) afterwards.")
@click.option("-e", "--env", "env_items", multiple=True, metavar="KEY=VALUE",
              help="Set a variable for the command (repeatable). Only PATH, locale, CI, colour and "
                   "TIEREMU_* variables are passed from the host.")
@click.option("--accel", type=click.Choice(ACCELS), default=lambda: os.environ.get(ACCEL_ENV, "tcg"),
              show_default=f"${ACCEL_ENV} or tcg", help="QEMU accelerator (KVM is rarely usable nested).")
@click.option("-q", "--quiet", is_flag=True, help="No summary line after a run that exits.")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def run(topology: Path, timeout: float, jobdir: Path | None, keep: bool, env_items: tuple[str, ...], accel: str,
        quiet: bool, command: tuple[str, ...]) -> None:
    """Boot the guest, run COMMAND inside it, and exit with COMMAND's exit code.

    Write `--` before COMMAND. The host's / is the guest's root, read-only, so the project tree and its
    .venv are at the same paths and COMMAND runs in the current folder; the only host folder the guest
    can write is the job folder (TIEREMU_VM_JOBDIR). Inside, TIEREMU_IN_VM=1, PYTHONDONTWRITEBYTECODE=1,
    and TIEREMU_VM_KERNEL / TIEREMU_VM_HMAT_TIERS say which kernel booted. COMMAND's stdout and stderr
    stream live to this command's stdout and stderr.

    Exit codes besides COMMAND's: 124 guest timed out, 125 guest crashed (no exit code written),
    69 QEMU cannot start here (missing QEMU, kernel or busybox, or QEMU refused to start),
    130/143 interrupted (the guest is killed either way).
    """
    spec = load_topology(topology)
    extra = _env_pairs(env_items)
    try:
        report = vm_assets.prepare(keep_current=True)
    except VmUnavailable as exc:
        _unavailable(exc)
        return
    for action in report.actions:
        _say(f"prepare: {action}")
    for note in report.notes:
        _say(f"NOTE: {note}")
    try:
        result = run_in_guest(spec, report.assets, command, timeout=timeout, env=extra, jobdir=jobdir, keep=keep,
                              accel=accel)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    _report(result, spec.name, report.assets.kernel.release, quiet)
    sys.exit(result.exit_code)


def _report(result: RunResult, name: str, kernel: str, quiet: bool) -> None:
    guest_clock = ""
    if result.boot_seconds is not None:
        guest_clock = f" (guest clock: kernel to command {result.boot_seconds:.1f} s"
        if result.command_seconds is not None:
            guest_clock += f", command {result.command_seconds:.1f} s"
        guest_clock += ")"
    if result.outcome is Outcome.EXITED:
        if not quiet:
            _say(f"{name} guest, kernel {kernel}: command exited {result.exit_code}; boot to poweroff "
                 f"{result.seconds:.1f} s{guest_clock}")
        return
    _say(f"{result.message} [{name} guest, kernel {kernel}, {result.seconds:.1f} s{guest_clock}; exit "
         f"{result.exit_code}]")
    if result.outcome in (Outcome.CRASHED, Outcome.TIMED_OUT, Outcome.FAILED_TO_START):
        console = result.rundir / "console.log"
        if console.is_file():
            lines = console.read_text(errors="replace").splitlines()[-CONSOLE_TAIL_LINES:]
            if lines:
                _say(f"last {len(lines)} lines of the guest console:")
                for line in lines:
                    click.echo(f"  | {line}", err=True)
    if result.kept:
        _say(f"run folder kept: {result.rundir}")
