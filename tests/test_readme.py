"""Every command and code snippet of the README runs as written on this machine (one NUMA node is enough), or is
skipped here with the reason it cannot run; and every option the README's command table names exists.

The commands run in a scratch folder that sees the repository's configs/ and docs/ (read only) and a traces/ of
its own, with `tieremu` meaning this checkout's `python -m tieremu`. The blocks run side by side (each block's
commands in order, as a reader would type them), so the whole file takes about as long as its slowest block.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import click
import pytest

from tieremu.cli.root import main

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
TIMEOUT_S = 600  # per command: a hung command fails the test instead of hanging it

# Commands that cannot run in a test on this machine, by how they start, with the reason.
SKIPS = {
    "bash scripts/run.sh": "CI runs it (set-up with apt, then the default experiment: tests/test_experiment.py runs "
                           "the same experiment)",
    "bash scripts/test.sh": "CI runs it (it runs this test suite)",
    "sudo scripts/setup-lab.sh": "writes the machine's kernel knobs as root: for a lab server (tests/test_lab_*.py "
                                 "apply and tear down profiles on a fixture sysfs tree)",
    "sudo scripts/teardown-lab.sh": "restores a profile applied by setup-lab.sh on a lab server",
    "tieremu ray-node --head --start": "starts a Ray head that outlives the command, for a multi-host cluster "
                                       "(tests/test_ray_backend.py starts a private one)",
    "tieremu ray-node --address HEAD:6379": "HEAD is another host of a Ray cluster",
    "RAY_AUTH_MODE=token tieremu run": "needs a Ray cluster at HEAD:6379, another host",
}
# Sections whose commands other tests run (with their own set-up), by the start of the section's heading.
SECTION_SKIPS = {
    "A real engine on the tiers": "runs vLLM's CPU build (tests/test_engine_vllm.py runs `tieremu engine replay` on "
                                  "the shipped trace); the server command runs until it is stopped, and DIR is a "
                                  "model directory of yours",
}


@dataclass(frozen=True)
class Snippet:
    lang: str  # bash, python or yaml
    text: str
    line: int  # where it starts in the README
    section: str  # the chapter (## heading) it is under

    @property
    def id(self) -> str:
        first = self.text.strip().splitlines()[0] if self.text.strip() else ""
        return f"L{self.line}:{self.lang}:{first[:60]}"


def snippets() -> list[Snippet]:
    """Every fenced block's commands: a bash block gives one snippet per command (continuation lines joined); a
    python or yaml block is one snippet."""
    out: list[Snippet] = []
    section, lang, start, body = "", None, 0, []
    for number, line in enumerate(README.read_text().splitlines(), 1):
        if lang is None and line.startswith("## "):
            section = line.lstrip("#").strip()  # the chapter: a skip by section covers its subsections too
        if line.startswith("```"):
            if lang is None:
                lang, start, body = line[3:].strip(), number, []
                continue
            if lang == "bash":
                out += _commands(body, start, section)
            elif lang in ("python", "yaml"):
                out.append(Snippet(lang, "\n".join(body), start, section))
            lang = None
            continue
        if lang is not None:
            body.append(line)
    return out


def _commands(body: list[str], start: int, section: str) -> list[Snippet]:
    """One command per line, with `\\` continuations and quotes that span lines joined, as bash reads them."""
    commands, current, first = [], "", 0
    for offset, line in enumerate(body, 1):
        if not current:
            first = start + offset
        current += line.rstrip("\\").rstrip() + " " if line.endswith("\\") else line + "\n"
        if not line.endswith("\\") and _complete(current):
            if current.strip() and not current.strip().startswith("#"):
                commands.append(Snippet("bash", current.strip(), first, section))
            current = ""
    assert not current.strip(), f"README line {first}: a command that never ends"
    return commands


def _complete(command: str) -> bool:
    try:
        shlex.split(command, comments=True)
    except ValueError:  # an open quote: the command goes on on the next line
        return False
    return True


def skip_reason(snippet: Snippet) -> str | None:
    for heading, reason in SECTION_SKIPS.items():
        if snippet.section.startswith(heading):
            return reason
    if snippet.lang == "bash":
        for prefix, reason in SKIPS.items():
            if snippet.text.startswith(prefix):
                return reason
        if snippet.text.startswith("tieremu vm run"):
            from tieremu.vm import assets

            if shutil.which("qemu-system-x86_64") is None:
                return "QEMU is not installed here (scripts/bootstrap.sh installs it)"
            if not (assets.cache_dir() / "kernel.json").is_file():
                return (f"the guest kernel is not prepared in {assets.cache_dir()} (`tieremu vm prepare` fetches it "
                        "from the Debian archive; scripts/test.sh does so before its guest stage)")
    return None


SNIPPETS = snippets()


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int, str]]:
    """Every runnable snippet run once: exit code and output by snippet id. Blocks run side by side."""
    work = tmp_path_factory.mktemp("readme")
    for name in ("configs", "docs", "tests", "benchmarks", "scripts"):
        (work / name).symlink_to(REPO / name)
    (work / "traces").mkdir()
    (work / "traces" / "mooncake_synthetic_trace.jsonl").symlink_to(REPO / "traces" / "mooncake_synthetic_trace.jsonl")
    (work / "bin").mkdir()
    shim = work / "bin" / "tieremu"
    shim.write_text(f"#!/bin/sh\nexec {sys.executable} -m tieremu \"$@\"\n")
    shim.chmod(0o755)
    env = {**os.environ, "PATH": f"{work / 'bin'}:{os.environ['PATH']}", "PYTHONPATH": str(REPO),
           "COLUMNS": "160"}
    blocks: dict[int, list[Snippet]] = {}
    for s in SNIPPETS:
        if skip_reason(s) is None:
            blocks.setdefault(s.line if s.lang != "bash" else _block_of(s), []).append(s)

    def run_block(items: list[Snippet]) -> list[tuple[str, tuple[int, str]]]:
        return [(s.id, _run(s, work, env)) for s in items]

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = [r for done in pool.map(run_block, blocks.values()) for r in done]
    return dict(results)


def _block_of(snippet: Snippet) -> int:
    """The line of the fence that opens the snippet's block."""
    lines = README.read_text().splitlines()[: snippet.line]
    return max(i for i, line in enumerate(lines, 1) if line.startswith("```"))


def _run(snippet: Snippet, work: Path, env: dict[str, str]) -> tuple[int, str]:
    if snippet.lang == "bash":
        argv = ["bash", "-o", "pipefail", "-ec", snippet.text]
    elif snippet.lang == "python":
        argv = [sys.executable, "-c", snippet.text]
    else:
        argv = [sys.executable, "-c", _YAML_CHECK, snippet.text]
    try:
        out = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return 124, f"timed out after {TIMEOUT_S} s"
    return out.returncode, (out.stdout + out.stderr)[-4000:]


# A YAML block is a tier map or an experiment spec: written where its relative paths resolve, then read strictly
# (and a spec expanded into its runs), as `tieremu check` and `tieremu run` would before any work.
_YAML_CHECK = textwrap.dedent("""
    import sys, pathlib, yaml
    text = sys.argv[1]
    data = yaml.safe_load(text)
    folder = pathlib.Path("snippet-yaml/experiments")
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("tiers", "traces"):
        link = folder.parent / name
        if not link.exists():
            link.symlink_to(pathlib.Path("configs", name).resolve())
    path = folder / "snippet.yaml"
    path.write_text(text)
    if "jobs" in data:
        from tieremu.runner.spec import load_experiment
        from tieremu.runner.sweep import expand
        print(len(expand(load_experiment(path))), "runs")
    else:
        from tieremu.tiers.config import load_tier_map
        print(load_tier_map(path).names)
""")


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[s.id for s in SNIPPETS])
def test_readme_snippet_runs_as_written(snippet: Snippet, outcomes: dict[str, tuple[int, str]]) -> None:
    if (reason := skip_reason(snippet)) is not None:
        pytest.skip(reason)
    code, output = outcomes[snippet.id]
    assert code == 0, f"README line {snippet.line}: `{snippet.text}` exited {code}:\n{output}"


def test_the_readme_has_the_commands_it_promises() -> None:
    ids = [s.id for s in SNIPPETS]
    assert len(ids) == len(set(ids)), "two README snippets start alike on one line"
    texts = [s.text for s in SNIPPETS]
    assert any(t.startswith("tieremu run configs/experiments/small.yaml --dry-run") for t in texts)
    assert any(s.lang == "python" and "migrate(" in s.text for s in SNIPPETS)
    used = {prefix for prefix in SKIPS if any(t.startswith(prefix) for t in texts)}
    assert used == set(SKIPS), f"skip reasons for commands the README no longer has: {set(SKIPS) - used}"


def _options(command: click.Command) -> set[str]:
    names = {opt for p in command.params if isinstance(p, click.Option) for opt in (*p.opts, *p.secondary_opts)}
    if isinstance(command, click.Group):
        ctx = click.Context(command)
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            if sub is not None:
                names |= _options(sub)
    return names


def test_every_option_in_the_command_table_exists() -> None:
    rows = [line for line in README.read_text().splitlines() if line.startswith("| `tieremu ")]
    assert len(rows) > 10
    ctx = click.Context(main)
    for row in rows:
        synopsis = row.split("`")[1]
        for part in synopsis.split(" / "):  # `tieremu vm prepare` / `tieremu vm run ...`
            name = part.removeprefix("tieremu ").split()[0]
            command = main.get_command(ctx, name)
            assert command is not None, f"README names `tieremu {name}`, which does not exist"
            for option in re.findall(r"(?<![\w-])--[a-z][a-z-]*", part):
                assert option in _options(command), f"README: `tieremu {name}` has no option {option}"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but `-` and `_` dropped, spaces to `-`."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_link_in_the_readme_leads_somewhere() -> None:
    text = README.read_text()
    anchors = {_slug(line.lstrip("#")) for line in text.splitlines() if line.startswith("#")}
    for target in re.findall(r"\]\(([^)]+)\)", text):
        if target.startswith("#"):
            assert target[1:] in anchors, f"README links to {target}, which no heading makes"
        elif not target.startswith(("http://", "https://")):
            assert (REPO / target).exists(), f"README links to {target}, which is not in the repository"
    assert "(below)" not in text and "beside this repository" not in text
