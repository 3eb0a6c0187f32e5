"""DESIGN.md's layers, enforced: every import of a tieremu module points to the same layer or below, and click and
rich are imported only by the CLI layer, and Ray (an optional extra) only by the ray backend. Imports inside functions
count too (they run, later)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "tieremu"
# DESIGN.md's order, bottom first. Modules at the package's top level are listed by name.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("__init__", "errors", "record", "configfile", "numbers", "safefile", "processes"),
    ("numa", "native"),
    ("tiers",),
    ("probe",),
    ("kv",),
    ("policy", "daemon"),
    ("workloads", "engines"),
    ("cluster",),
    ("lab", "vm"),
    ("runner", "report", "bench"),
    ("cli", "__main__"),
)
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}
CLI_ONLY = ("click", "rich")
RAY_ONLY = "runner/ray_backend.py"  # the one module that imports Ray: nothing else fails when it is not installed


def _part(module: str) -> str:
    """The layer-owning part of a dotted tieremu module name: `tieremu.tiers.resolve` -> `tiers`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> list[tuple[str, int]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "tieremu":  # `from tieremu import __version__` is the package itself
                out += [(f"tieremu.{alias.name}", node.lineno) for alias in node.names
                        if (PACKAGE / alias.name).is_dir() or (PACKAGE / f"{alias.name}.py").exists()]
                out.append(("tieremu", node.lineno))
            else:
                out.append((node.module, node.lineno))
    return out


def violations(package: Path = PACKAGE) -> list[str]:
    found = []
    for path in sorted(package.rglob("*.py")):
        owner = _part(".".join(("tieremu", *path.relative_to(package).with_suffix("").parts)))
        if owner not in LAYER:
            found.append(f"{path.relative_to(package.parent)}: package {owner!r} has no layer in DESIGN.md's order")
            continue
        for module, line in _imports(path):
            where = f"{path.relative_to(package.parent)}:{line}"
            top = module.split(".")[0]
            if top in CLI_ONLY and owner != "cli":
                found.append(f"{where}: imports {module} below the CLI layer")
            if top == "ray" and path.relative_to(package).as_posix() != RAY_ONLY:
                found.append(f"{where}: imports {module} outside tieremu/{RAY_ONLY}")
            if top != "tieremu":
                continue
            target = _part(module)
            if target in LAYER and LAYER[target] > LAYER[owner]:
                found.append(f"{where}: {owner} (layer {LAYER[owner]}) imports {module} (layer {LAYER[target]})")
    return found


def test_imports_point_down_and_click_rich_stay_in_the_cli() -> None:
    assert violations() == []


def test_the_check_catches_an_upward_import_and_click_below_the_cli(tmp_path: Path) -> None:
    fake = tmp_path / "tieremu"
    (fake / "numa").mkdir(parents=True)
    (fake / "runner").mkdir()
    (fake / "numa" / "bad.py").write_text("def f():\n    from tieremu.runner.experiment import run_experiment\n")
    (fake / "runner" / "table.py").write_text("import rich.table\nfrom tieremu.numa import bad\nimport ray\n")
    (fake / "runner" / "ray_backend.py").write_text("import ray\n")
    assert violations(fake) == [
        "tieremu/numa/bad.py:2: numa (layer 1) imports tieremu.runner.experiment (layer 9)",
        "tieremu/runner/table.py:1: imports rich.table below the CLI layer",
        "tieremu/runner/table.py:3: imports ray outside tieremu/runner/ray_backend.py",
    ]
