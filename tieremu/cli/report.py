"""`tieremu report DIR... [--html] [--out FILE]`: the tables in the terminal, or one self-contained HTML page."""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console
from rich.table import Table as RichTable
from rich.text import Text

from tieremu.report.load import load_result
from tieremu.report.tables import Table, all_tables, provenance


@click.command("report")
@click.argument("folders", nargs=-1, required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--html", "as_html", is_flag=True,
              help="Write one self-contained HTML page (tables and plots inlined) and print its path.")
@click.option("--out", "out_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Where the HTML page goes (default: report.html in the folder, comparison.html in the first "
                   "folder when several are given).")
def report(folders: tuple[Path, ...], as_html: bool, out_file: Path | None) -> None:
    """Summary tables per job and policy (TPOT and TTFT p50/p99, tokens/s, hit ratio per tier, STRR, STAR,
    migration GB/s, slowdown vs all-fastest), with the origin of every figure and which tiers were emulated;
    several folders are compared side by side. Unfinished (.partial) and failed folders are refused."""
    results = [load_result(f) for f in folders]
    if as_html:
        from tieremu.report.html import write_report  # matplotlib: only when plots are drawn

        default = "report.html" if len(results) == 1 else "comparison.html"
        path = write_report(results, out_file or results[0].path / default)
        click.echo(str(path))
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
