"""One self-contained HTML page per report: tables, provenance and plots inlined as SVG at the page's full width,
nothing fetched from the network, so the file can be mailed, archived or opened offline years later.

Each figure carries what its axes show (`data-meta`: scale, limits, the data's range on them) so that a check, or a
reader's script, can tell what was drawn without parsing the drawing. The plots are also written to plots/ as
<name>.svg and <name>.png, with every figure's facts in plots/figures.json.
"""

from __future__ import annotations

import datetime as dt
import html
import json
import re
from pathlib import Path

from tieremu import __version__
from tieremu.report.load import ResultSet
from tieremu.report.plots import Plot, all_plots
from tieremu.report.tables import Table, all_tables, provenance
from tieremu.safefile import atomic_write

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1400px; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; }
.provenance { background: #f4f6fa; border-left: 4px solid #4a6fa5; padding: 0.6em 1em; }
.provenance li.warning { color: #a33; }
.table-wrap { overflow-x: auto; max-width: 100%; }
table { border-collapse: collapse; margin: 0.5em 0 0.2em; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #eef; } td.text, th:first-child { text-align: left; }
caption { caption-side: top; font-weight: bold; text-align: left; padding: 0.3em 0; }
p.note { font-size: 0.8em; color: #555; margin-top: 0; }
figure { display: block; width: 100%; margin: 1.5em 0; }
figure svg { display: block; width: 100%; height: auto; }
figcaption { font-size: 0.85em; color: #444; }
"""


def write_report(results: list[ResultSet], out: Path, *, plots_dir: Path | None = None) -> Path:
    """Draw everything, write the page atomically (and each plot as SVG and PNG into plots_dir when given, with
    figures.json); returns the page."""
    tables = all_tables(results)
    plots = all_plots(results)
    if plots_dir is not None:
        plots_dir.mkdir(parents=True, exist_ok=True)
        for plot in plots:
            _atomic_write(plots_dir / f"{plot.name}.svg", plot.svg)
            _atomic_write(plots_dir / f"{plot.name}.png", plot.png)
        _atomic_write(plots_dir / "figures.json", json.dumps([p.meta() for p in plots], indent=1).encode())
    _atomic_write(out, render(results, tables, plots).encode())
    return out


def render(results: list[ResultSet], tables: list[Table], plots: list[Plot]) -> str:
    title = "tieremu report: " + ", ".join(r.name for r in results)
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{_e(title)}</title>\n"
             f"<style>{STYLE}</style>\n</head>\n<body>\n<h1>{_e(title)}</h1>"]
    for result in results:
        parts.append(_provenance(result, len(results) > 1))
    parts.append("<h2>Tables</h2>")
    parts += [_table(t, i) for i, t in enumerate(tables)]
    if plots:
        parts.append("<h2>Plots</h2>")
        parts += [_figure(p) for p in plots]
    stamp = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    parts.append(f"<p class=\"note\">written by tieremu {_e(__version__)} at {stamp} from "
                 + ", ".join(f"<code>{_e(str(r.final_path))}</code>" for r in results) + "</p>\n</body>\n</html>\n")
    return "\n".join(parts)


def _provenance(result: ResultSet, named: bool) -> str:
    warning = ' class="warning"'
    items = [f"<li{warning if line.startswith('warning') else ''}>{_e(line)}</li>" for line in provenance(result)]
    items.append(f"<li>{_e(machine_line(result))}</li>")
    heading = f"<h2>{_e(result.name)}</h2>" if named else ""
    return f"{heading}<ul class=\"provenance\" id=\"provenance-{_e(result.name)}\">{''.join(items)}</ul>"


def machine_line(result: ResultSet) -> str:
    """The machine as the manifest and the run records know it. `in_vm` is whether the runs ran inside tieremu's
    multi-node QEMU guest; whether the host itself is a virtual machine is not recorded, but hypervisor steal time
    in the runs' load samples shows it."""
    m = result.manifest
    guest = ("yes: kernel semantics real, speeds emulation artefacts" if m.get("in_vm") else
             "no, figures from this host")
    stolen = [r for r in result.runs if (r.steal_fraction or 0) > 0]
    steal = (f"hypervisor steal time seen in {len(stolen)} of {len(result.runs)} runs (a virtual machine)" if stolen
             else "no hypervisor steal time seen in the runs")
    return (f"machine: host name {m.get('hostname')!s}, CPU {m.get('cpu_model')}, {m.get('cpus')} CPUs, kernel "
            f"{m.get('kernel')}; inside tieremu's QEMU guest: {guest}; {steal}; git {m.get('git_revision')}"
            f"{' (dirty)' if m.get('git_dirty') else ''}")


def _table(table: Table, index: int) -> str:
    head = "".join(f"<th>{_e(c)}</th>" for c in table.columns)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in table.rows)
    note = f"<p class=\"note\">{_e(table.note)}</p>" if table.note else ""
    return (f"<div class=\"table-wrap\"><table id=\"table-{index}\" class=\"report-table\"><caption>"
            f"{_e(table.title)}</caption><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>{note}")


def _cell(value: str) -> str:
    """Figures right-aligned, words left-aligned."""
    numeric = value.replace(",", "").rstrip("x").replace(".", "", 1).lstrip("-").isdigit() or value == "-"
    return f"<td>{_e(value)}</td>" if numeric else f"<td class=\"text\">{_e(value)}</td>"


def _figure(plot: Plot) -> str:
    caption = _e(plot.title) + (f" — {_e(plot.caption)}" if plot.caption else "")
    meta = _e(json.dumps(plot.meta(), separators=(",", ":")))
    return (f"<figure id=\"plot-{_e(plot.name)}\" class=\"plot\" data-kind=\"{_e(plot.kind)}\" data-meta=\"{meta}\">"
            f"{inline_svg(plot.svg, plot.title)}<figcaption>{caption}</figcaption></figure>")


def inline_svg(svg: bytes, title: str) -> str:
    """matplotlib's SVG document as an element of the page: no XML prolog or DOCTYPE, scaled to the page's width by
    its viewBox, with a title for screen readers."""
    text = svg.decode("utf-8")
    text = text[text.index("<svg"):]
    head_end = text.index(">")
    head = re.sub(r'\s(width|height)="[^"]*"', "", text[:head_end])
    return f'{head} role="img" aria-label="{_e(title)}"{text[head_end:]}'


def _e(text: str) -> str:
    return html.escape(text, quote=True)


def _atomic_write(path: Path, data: bytes) -> None:
    atomic_write(path, data)
