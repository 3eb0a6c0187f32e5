"""The command line: --help everywhere, JSON outputs, exit codes and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from fixture_paths import fixture_root

from tieremu.cli import main

REPO = Path(__file__).resolve().parents[1]


def _commands(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = [prefix]
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            out += _commands(cmd, (*prefix, name))
        else:
            out.append((*prefix, name))
    return out


@pytest.mark.parametrize("path", _commands(main), ids=lambda p: " ".join(p) or "tieremu")
def test_every_command_has_help(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(main, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage: " in result.output and len(result.output.splitlines()) > 3


def test_python_dash_m_works() -> None:
    out = subprocess.run([sys.executable, "-m", "tieremu", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "tieremu, version 0.1.0"


def test_topo_json_from_a_fixture_root() -> None:
    result = CliRunner().invoke(main, ["topo", "--json", "--sysfs-root", str(fixture_root("two-socket-cpuless"))])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["online"] == [0, 1] and data["cpuless_nodes"] == [1]
    assert data["nodes"]["1"]["cpus"] == [] and data["nodes"]["0"]["distances"] == {"0": 10, "1": 21}


def test_topo_table_names_cpuless_nodes() -> None:
    result = CliRunner().invoke(main, ["topo", "--sysfs-root", str(fixture_root("cxl-expander"))])
    assert result.exit_code == 0, result.output
    assert "cpu-less" in result.output and "memory tiers:" in result.output


def test_check_json_on_this_machine(memory_nodes: tuple[int, ...]) -> None:
    result = CliRunner().invoke(main, ["check", "--json", "--size-mib", "1"])
    assert result.exit_code == 0, result.output
    checks = {c["tier"]: c for c in json.loads(result.output)["checks"]}
    assert checks["dram"]["status"] == "enforced" and checks["dram"]["pages_by_node"] == {"0": 256}
    assert checks["cxl"]["status"] == ("enforced" if 1 in memory_nodes else "emulated")


def test_check_refuses_a_timing_model_this_machine_cannot_honour(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  missing_node: int) -> None:
    from tieremu.probe import calibrate
    from tieremu.tiers.timing import Calibration

    cal = Calibration(machine="fixture", created_utc="2026-01-01T00:00:00+00:00", node=0, latency_ns=100.0,
                      bandwidth_gbps={"read": 20.0, "write": 10.0, "copy": 16.0}, latency_by_node={0: 100.0},
                      read_gbps_by_node={0: 20.0})
    monkeypatch.setattr(calibrate, "calibration", lambda topo: cal)
    fast = tmp_path / "fast.yaml"
    fast.write_text(f"name: x\ntiers:\n  - {{name: dram, nodes: [0]}}\n  - {{name: cxl, nodes: [{missing_node}], "
                    "allow_emulation: true, emulate: {bandwidth_ratio: 1.5}}\n")
    result = CliRunner().invoke(main, ["check", "--tiers", str(fast)])
    assert result.exit_code == 2
    assert "tier 'cxl': target read bandwidth 30.0 GB/s is above what its memory (node 0) gives, 20.0 GB/s" in \
        result.output and "ask for bandwidth_ratio <= 1.00" in result.output


def test_errors_are_one_line_with_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "t.yaml"
    bad.write_text("name: x\ntiers:\n  - name: a\n    nodes: [0]\n    policy: spread\n")
    result = CliRunner().invoke(main, ["check", "--tiers", str(bad)])
    assert result.exit_code == 2
    assert result.output.strip().startswith(f"tieremu: error: {bad}: tiers[0].policy: 'spread' is not valid")
    assert "Traceback" not in result.output


def test_run_prints_where_results_landed(tmp_path: Path) -> None:
    spec = tmp_path / "e.yaml"
    spec.write_text(f"name: clirun\ntiers: {REPO / 'configs/tiers/single-node.yaml'}\n"
                    "jobs:\n  - {kind: synthetic, policies: [], tokens: 4}\n")
    result = CliRunner().invoke(main, ["run", str(spec), "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    [line] = [line for line in result.output.splitlines() if line.startswith("results: ")]
    landed = Path(line.removeprefix("results: "))
    assert landed.parent == tmp_path / "r" / "clirun" and (landed / "manifest.json").exists()


def test_bench_placement_json_reports_medians(memory_nodes: tuple[int, ...]) -> None:
    result = CliRunner().invoke(main, ["bench", "placement", "--size-mib", "8", "--repeats", "3", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["query_pages_per_s"]["n"] == 3 and data["query_pages_per_s"]["median"] > 0
    assert len(data["migrations"]) == len(memory_nodes) * (len(memory_nodes) - 1)
    assert data["load"]["cpus"] >= 1


def test_lazy_subcommands_list_their_own_short_help() -> None:
    # `tieremu --help` lists lazy subcommands from a table so that it imports none of them; the table must say
    # what each command's docstring says.
    from tieremu.cli.root import SUBCOMMANDS

    for name, entry in SUBCOMMANDS.items():
        assert entry.short_help == entry.load().get_short_help_str(10_000), name


def _heavy_modules_after(*argvs: list[str]) -> list[str]:
    code = ("import sys; from click.testing import CliRunner; from tieremu.cli import main\n"
            f"for a in {list(argvs)!r}: CliRunner().invoke(main, a, catch_exceptions=False)\n"
            "print(sorted(m for m in ('torch', 'numpy', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    return json.loads(out.stdout.strip().replace("'", '"'))


def test_help_and_topo_import_neither_torch_nor_numpy() -> None:
    assert _heavy_modules_after(["--help"], ["topo"]) == []


def test_subcommand_help_and_simulated_replay_do_not_import_torch() -> None:
    trace = str(REPO / "traces" / "mooncake_synthetic_trace.jsonl")
    heavy = _heavy_modules_after(["run", "--help"], ["report", "--help"], ["probe", "--help"],
                                 ["replay", trace, "--tiers", str(REPO / "configs/tiers/cxl-expander.yaml"),
                                  "--policy", "lru", "--json"])
    assert "torch" not in heavy and "matplotlib" not in heavy


def _leaf_commands(command: click.Command, path: tuple[str, ...] = ()) -> list[tuple[str, click.Command]]:
    if isinstance(command, click.Group):
        ctx = click.Context(command)
        return [leaf for name in command.list_commands(ctx)
                for leaf in _leaf_commands(command.get_command(ctx, name), (*path, name))]  # type: ignore[arg-type]
    return [(" ".join(path), command)]


# Commands whose outcome is not a result to print as JSON, and why.
NO_JSON = {"vm run": "exits with COMMAND's exit code; COMMAND's own output is the result",
           "vm prepare": "fetches the guest's kernel; its report is a few lines of what was done"}


def test_one_option_vocabulary_across_commands() -> None:
    """Every option has help; every command that produces a result has --json; --out is always a folder; epochs
    are milliseconds; no command takes a block size in two units."""
    leaves = _leaf_commands(main)
    assert len(leaves) > 25
    for name, command in leaves:
        assert command.help, f"tieremu {name} has no help"
        options = {opt: p for p in command.params if isinstance(p, click.Option) for opt in p.opts}
        for opt, param in options.items():
            assert param.help, f"tieremu {name} {opt} has no help"
        assert ("--json" in options) != (name in NO_JSON), f"tieremu {name}: --json missing (or listed in NO_JSON)"
        if "--out" in options:
            kind = options["--out"].type
            assert isinstance(kind, click.Path) and not kind.file_okay, f"tieremu {name} --out is not a folder"
        assert not any(o.startswith("--epoch-") and o != "--epoch-ms" for o in options), f"tieremu {name}: epoch unit"
        assert not ({"--block-mib", "--block-kib"} <= set(options)), f"tieremu {name}: a block size in two units"
    for argument in (p for _, c in leaves for p in c.params if isinstance(p, click.Argument)):
        assert argument.name not in ("out", "out_file"), "an output is an --out folder, not a positional argument"
