"""`tieremu lab`: plan, apply, check and undo root-only lab profiles (configs/lab/*.yaml)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from rich.console import Console

from tieremu.cli.lab_views import entries_json, plan_json, plan_table, status_table, undo_table
from tieremu.lab.applier import Applier, Terminated, UndoReport, load_journal, require_root, undo
from tieremu.lab.journal import STATE_ENV
from tieremu.lab.kernelfs import KernelFS
from tieremu.lab.profile import find_profile, load_profile, resolve_profile
from tieremu.lab.status import active_profiles, profile_status
from tieremu.numa.sysfs import ROOT_ENV

_root_option = click.option(
    "--sysfs-root", type=click.Path(exists=True, file_okay=False), default=None,
    help=f"Work on sys/ and proc/ under this directory instead of / (also: ${ROOT_ENV}).")
_json_option = click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON.")
_state_option = click.option(
    "--state-dir", type=click.Path(file_okay=False), default=None,
    help=f"Where journals of applied profiles live (default /var/lib/tieremu/lab under the sysfs root, so inside "
         f"the fixture with --sysfs-root; also: ${STATE_ENV}).")


def _console() -> Console:
    return Console(width=max(120, Console().width))


def _say(message: str) -> None:
    click.echo(f"tieremu lab: {message}", err=True)


@click.group(name="lab")
def lab() -> None:
    """Root-only lab profiles that turn a server into a CXL or remote-memory testbed, reversibly.

    A profile (configs/lab/*.yaml, or a path) lists actions: offline a node's CPUs (a CPU-less node),
    uncore frequency limits, resctrl MBA, NUMA balancing, demotion, THP, huge pages, hygiene knobs, swap,
    a cgroup for the workload. `apply` journals every old value on disk before writing it and rolls back
    on any failure, Ctrl-C, SIGTERM or SIGHUP; `teardown` restores from the journal, also after a crash.
    With --sysfs-root (test mode) nothing outside that tree is touched: swap calls edit its proc/swaps.
    """


def _echo_json(data: object) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


@lab.command()
@click.argument("profile")
@_root_option
@_json_option
def plan(profile: str, sysfs_root: str | None, as_json: bool) -> None:
    """Show every write PROFILE would make (path, old value, new value) and what this machine lacks.
    Needs no root and writes nothing."""
    applier = Applier(resolve_profile(profile), KernelFS(sysfs_root))
    if as_json:
        _echo_json(plan_json(applier.plan()))
        return
    _console().print(plan_table(applier.plan()))


@lab.command()
@click.argument("profile")
@click.option("--dry-run", is_flag=True, help="Only show the plan; write nothing (needs no root).")
@_root_option
@_state_option
@_json_option
def apply(profile: str, dry_run: bool, sysfs_root: str | None, state_dir: str | None, as_json: bool) -> None:
    """Apply PROFILE as root: journal each old value durably, then write it; roll back on any failure."""
    applier = Applier(resolve_profile(profile), KernelFS(sysfs_root), state_dir)
    console = _console()
    if dry_run:
        if as_json:
            _echo_json(plan_json(applier.plan()) | {"dry_run": True})
        else:
            console.print(plan_table(applier.plan()))
        _say("dry run: nothing written")
        return
    try:
        report = applier.apply()
    except (KeyboardInterrupt, Terminated) as exc:
        _say(f"interrupted ({type(exc).__name__}): every write made so far was rolled back")
        sys.exit(130 if isinstance(exc, KeyboardInterrupt) else 128 + exc.signum)
    if as_json:
        _echo_json({"profile": report.profile, "journal": str(report.journal), "writes": report.writes,
                    "skipped": [{"action": label, "reason": reason} for label, reason in report.skipped]})
    for label, reason in report.skipped:
        _say(f"skipped {label}: unsupported here ({reason})")
    _say(f"applied {report.profile}: {report.writes} write(s), journal {report.journal}; "
         f"undo with `tieremu lab teardown {report.profile}`")


@lab.command()
@click.argument("profile", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print active profiles (or PROFILE's knobs) as JSON.")
@_root_option
@_state_option
def status(profile: str | None, as_json: bool, sysfs_root: str | None, state_dir: str | None) -> None:
    """Whether PROFILE is active, and each knob's profile value against the value now (drift).
    Without PROFILE: every active profile. Exits 1 when an active profile has drifted."""
    if profile is None:
        active = active_profiles(sysfs_root, state=state_dir)
        if as_json:
            click.echo(json.dumps(active, indent=2))
            return
        if not active:
            click.echo("no lab profile is active")
        for p in active:
            since = f" since {p['applied_utc']}" if p.get("applied_utc") else ""
            click.echo(f"{p['name']}: {p.get('state', p.get('error'))}{since} "
                       f"({len(p.get('knobs', []))} recorded knob(s))")
        return
    result = profile_status(resolve_profile(profile), KernelFS(sysfs_root), state_dir)
    if as_json:
        click.echo(json.dumps({"profile": result.profile.name, "active": result.active,
                               "journal": None if result.journal is None else result.journal.state,
                               "knobs": [{"action": k.action, "knob": k.knob, "profile": k.wanted, "now": k.now,
                                          "ok": k.ok} for k in result.knobs],
                               "unsupported": [{"action": u.action, "reason": u.reason, "required": u.required}
                                               for u in result.unsupported]}, indent=2))
    else:
        _console().print(status_table(result))
    if result.active and result.drift:
        sys.exit(1)


@lab.command()
@click.argument("profile")
@click.option("--dry-run", is_flag=True, help="Only show what would be restored; write nothing.")
@_root_option
@_state_option
@_json_option
def teardown(profile: str, dry_run: bool, sysfs_root: str | None, state_dir: str | None, as_json: bool) -> None:
    """Restore every knob PROFILE changed, newest first, from its journal (also one left by a crash).
    PROFILE is a profile file, a shipped profile name, or the name of an active profile."""
    path = find_profile(profile)
    name = load_profile(path).name if path is not None else profile
    fs = KernelFS(sysfs_root)
    if not dry_run:
        require_root(f"tearing down lab profile {name}")
    journal = load_journal(name, fs, state_dir)
    console = _console()
    if dry_run:
        if as_json:
            _echo_json({"profile": name, "dry_run": True, "state": journal.state,
                        "would_restore": entries_json(journal.entries)})
        else:
            console.print(undo_table(name, journal.entries, f"would restore ({journal.state})"))
        _say("dry run: nothing written")
        return
    entries = list(journal.entries)
    report = undo(journal, fs)
    if as_json:
        _echo_json({"profile": name, "restored": entries_json(report.undone),
                    "failed": [{**entries_json([e])[0], "error": message} for e, message in report.failures],
                    "not_restored": [{**entries_json([e])[0], "now": now} for e, now in report.not_restored]})
    else:
        console.print(undo_table(name, entries, "restored"))
    _report_undo(name, report, journal.path)


def _report_undo(name: str, report: UndoReport, journal: Path) -> None:
    for entry, now in report.not_restored:
        _say(f"warning: {entry.step.target} was set back but reads {now!r}, not {entry.step.shown_restore!r}")
    if report.failures:
        for _, message in report.failures:
            _say(f"could not restore: {message}")
        _say(f"{len(report.failures)} step(s) remain in {journal}; fix the cause and run teardown again")
        sys.exit(2)
    _say(f"tore down {name}: {len(report.undone)} step(s) undone, journal removed")
