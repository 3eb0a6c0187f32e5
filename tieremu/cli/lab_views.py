"""Terminal tables for lab plans, status and teardown; the data stays in the plan and status dataclasses."""

from __future__ import annotations

from collections.abc import Sequence

from rich.table import Table
from rich.text import Text

from tieremu.lab.journal import Entry
from tieremu.lab.plan import Plan
from tieremu.lab.status import ProfileStatus
from tieremu.lab.steps import Step


def _v(value: str | None) -> Text:
    # Text, not markup: kernel values hold brackets ("[madvise]") that rich would read as styles.
    return Text("(absent)" if value is None else value if value != "" else "(empty)")


def plan_table(plan: Plan) -> Table:
    table = Table(title=f"lab profile {plan.profile.name}: planned writes (root {plan.root})")
    for col in ("action", "path", "old", "new"):
        table.add_column(col, overflow="fold")
    for a in plan.actions:
        if a.unsupported is not None:
            verdict = "REFUSES the profile" if a.action.required else "skipped"
            table.add_row(_v(a.label), _v(a.action.describe()), Text(f"unsupported: {a.unsupported}"),
                          Text(verdict, style="bold red" if a.action.required else "yellow"))
            continue
        if not a.steps:
            table.add_row(_v(a.label), _v(a.action.describe()), Text("already as wanted", style="green"), Text("-"))
        for step in a.steps:
            table.add_row(_v(a.label), _v(step.target), _v(step.shown_old), _v(step.new))
    writes, blocking = len(plan.steps), len(plan.blocking)
    table.caption = f"{writes} write(s); " + (f"{blocking} required action(s) unsupported: apply would refuse"
                                                if blocking else "apply records each old value before writing it")
    return table


def status_table(status: ProfileStatus) -> Table:
    j = status.journal
    if j is None:
        state = "not applied"
    elif status.active:
        state = f"active since {j.applied_utc}"
    else:
        state = f"{j.state}: run `tieremu lab teardown {status.profile.name}`"
    table = Table(title=f"lab profile {status.profile.name}: {state}")
    for col in ("action", "knob", "profile", "now", "state"):
        table.add_column(col, overflow="fold")
    for k in status.knobs:
        if k.ok:
            verdict = Text("ok", style="green")
        else:
            verdict = Text("DRIFT", style="bold red") if status.active else Text("differs")
        table.add_row(_v(k.action), _v(k.knob), _v(k.wanted), _v(k.now), verdict)
    for u in status.unsupported:
        table.add_row(_v(u.action), Text(f"unsupported: {u.reason}"), Text("-"), Text("-"),
                      Text("required" if u.required else "skipped", style="yellow"))
    if status.active:
        drift = len(status.drift)
        table.caption = f"{drift} knob(s) drifted since apply" if drift else "every knob holds the profile's value"
    return table


def undo_table(name: str, entries: list[Entry], title: str) -> Table:
    table = Table(title=f"lab profile {name}: {title}")
    for col in ("action", "path", "set", "restore to"):
        table.add_column(col, overflow="fold")
    for e in reversed(entries):
        table.add_row(_v(e.action), _v(e.step.target), _v(e.step.new), _v(e.step.shown_restore))
    return table


def step_json(step: Step) -> dict[str, str | None]:
    return {"path": step.target, "old": step.shown_old, "new": getattr(step, "new", None),
            "restore": step.shown_restore}


def plan_json(plan: Plan) -> dict[str, object]:
    """`lab plan --json` / `apply --dry-run --json`: every planned write and every unsupported action."""
    return {"profile": plan.profile.name, "root": plan.root, "writes": len(plan.steps),
            "blocking": [a.label for a in plan.blocking],
            "actions": [{"action": a.label, "describe": a.action.describe(), "required": a.action.required,
                         "unsupported": a.unsupported, "steps": [step_json(s) for s in a.steps]}
                        for a in plan.actions]}


def entries_json(entries: Sequence[Entry]) -> list[dict[str, object]]:
    return [{"action": e.action, **step_json(e.step)} for e in entries]
