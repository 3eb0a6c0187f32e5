"""`tieremu reference [--out DIR] [--check] [--json]`: the reference of every experiment-spec and tier-map key,
generated from the validators (tieremu.runner.reference) into DIR/reference.md."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

import click

from tieremu.runner.reference import groups, reference_markdown, write_reference


@click.command("reference")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("docs"),
              show_default=True, help="Folder reference.md is written into (created if missing).")
@click.option("--check", is_flag=True,
              help="Write nothing; exit 1 if OUT/reference.md differs from what would be written (for CI).")
@click.option("--json", "as_json", is_flag=True,
              help="Print every key (path, types, default, valid values, meaning) as JSON instead of writing.")
def reference(out_dir: Path, check: bool, as_json: bool) -> None:
    """Write the reference of every experiment-spec and tier-map key (type, default, valid values, meaning),
    generated from the validators themselves, to OUT/reference.md."""
    if as_json:
        click.echo(json.dumps([{"group": g.title, "about": g.about,
                                "keys": [asdict(k) | {"asked_by": sorted(k.asked_by), "meaning": g.help[k.path]}
                                         for k in g.keys]} for g in groups(strict=False)], indent=2))
        return
    if check:
        path = out_dir / "reference.md"
        current = path.read_text() if path.is_file() else None
        if current != reference_markdown():
            click.echo(f"{path} is out of date: run `tieremu reference --out {out_dir}`", err=True)
            sys.exit(1)
        click.echo(f"{path} is up to date")
        return
    click.echo(str(write_reference(out_dir)))
