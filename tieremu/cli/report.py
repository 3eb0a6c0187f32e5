"""`tieremu report DIR... [--html] [--out DIR] [--json]`: the tables in the terminal (or as JSON), or one
self-contained HTML page."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table as RichTable
from rich.text import Text

from tieremu.errors import ConfigError
from tieremu.report.load import load_result
from tieremu.report.tables import Table, all_tables, provenance


@click.command("report")
@click.argument("folders", nargs=-1, required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--html", "as_html", is_flag=True,
              help="Write one self-contained HTML page (tables and plots inlined) and print its path.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder the HTML page goes into, as report.html (comparison.html when several folders are "
                   "given), with each figure as SVG and PNG in plots/ (comparison-plots/); implies --html. "
                   "Default: the (first) result folder.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the tables (title, columns, rows, note) and each folder's provenance as JSON.")
def report(folders: tuple[Path, ...], as_html: bool, out_dir: Path | None, as_json: bool) -> None:
    """Summary tables per job and policy (TPOT and TTFT p50/p99, tokens/s, hit ratio per tier, STRR, STAR,
    migration GB/s, slowdown vs all-fastest), with the origin of every figure and which tiers were emulated;
    several folders are compared side by side. Unfinished (.partial) and failed folders are refused."""
    results = [load_result(f) for f in folders]
    if as_html or out_dir is not None:
        from tieremu.report.html import write_report  # matplotlib: only when plots are drawn

        name = "report.html" if len(results) == 1 else "comparison.html"
        if out_dir is not None and out_dir.suffix.lower() in (".html", ".htm"):
            raise click.UsageError(f"--out is the folder the page goes into (as {name}), not a file: "
                                   f"--out {out_dir.parent}")
        folder = out_dir or results[0].path
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"--out {folder}: cannot create the folder ({exc.strerror})") from None
        # Each figure also as SVG and PNG files for papers; a comparison's beside, never over, a run's own plots.
        plots = folder / ("plots" if len(results) == 1 else "comparison-plots")
        path = write_report(results, folder / name, plots_dir=plots)
        click.echo(json.dumps({"html": str(path)}) if as_json else str(path))
        return
    if as_json:
        click.echo(json.dumps({"folders": [{"path": str(r.path), "name": r.name, "provenance": provenance(r)}
                                           for r in results],
                               "tables": [asdict(t) for t in all_tables(results)]}, indent=2, default=str))
        return
    console = Console()
    for result in results:
        console.print(result.name, style="bold", markup=False)
        for line in provenance(result):
            console.print(f"  {line}", highlight=False, markup=False)
    for table in all_tables(results):
        rich_table = to_rich(table)
        # As wide as the table needs: a terminal wraps long lines, while a squeezed table breaks every cell.
        natural = Console(width=1000).measure(rich_table).maximum
        Console(width=max(console.width, natural)).print(rich_table)


def to_rich(table: Table) -> RichTable:
    # Text, not markup: a cell such as "hit_ratio[dram]" must not be read as a style tag.
    out = RichTable(title=Text(table.title), caption=Text(table.note) if table.note else None)
    for column in table.columns:
        out.add_column(Text(column), overflow="fold")
    for row in table.rows:
        out.add_row(*(Text(cell) for cell in row))
    return out
