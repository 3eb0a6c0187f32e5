"""What bad input, signals, links and concurrent runs may never do (issue 16): one test per defect of the audit,
each reproducing it first, then asserting the clear error or the untouched victim."""

from __future__ import annotations

import json
import math
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from fixture_paths import fixture_root
from fixtures.lab.fakekernel import FakeKernel, Lab, make_lab, snapshot
from write_audit import listening, outside

import tieremu.cli.lab as lab_cli
import tieremu.lab.kernelfs as kernelfs
import tieremu.safefile as safefile
import tieremu.tiers.files as files
from tieremu.cli import main
from tieremu.daemon.attach import AttachConfig, attach
from tieremu.daemon.proctrack import AttachError
from tieremu.errors import ConfigError, TieremuError, TopologyError, TraceError
from tieremu.lab.applier import Applier, Terminated
from tieremu.lab.journal import DEFAULT_STATE
from tieremu.lab.kernelfs import KernelFS
from tieremu.lab.profile import load_profile
from tieremu.lab.values import parse_swaps
from tieremu.numa.topology import discover
from tieremu.probe import calibrate
from tieremu.runner.experiment import run_experiment
from tieremu.runner.results import ReopenedResultDir, ResultDir, ResultError
from tieremu.runner.spec import load_experiment
from tieremu.runner.sweep import expand
from tieremu.runner.worker import die_with_parent
from tieremu.safefile import UnsafeFileError, atomic_write
from tieremu.tiers.config import load_tier_map
from tieremu.tiers.files import BlockFile, FileTierError
from tieremu.workloads.trace import Request, read_trace, write_trace

REPO = Path(__file__).resolve().parents[1]
TIERS = REPO / "configs" / "tiers" / "cxl-expander.yaml"
PYTHON = sys.executable
ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="device nodes and PR_SET_PDEATHSIG checks need root here")
# Every run of a spec costs a process start: one policy and the two baselines keep it to three.
SYNTHETIC = "jobs:\n  - kind: synthetic\n    policies: [lru]\n    tokens: 4\n    requests: 2\n"


def _cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # a traceback is a failure of the test, never an outcome
    return result.exit_code, result.output


def _spec(folder: Path, body: str, name: str = "hard", tiers: Path = TIERS) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(f"name: {name}\ntiers: {tiers}\n{body}")
    return path


# ---- 1. the lab's test root never touches the real machine ----------------------------------------------------

class FixtureKernel(FakeKernel):
    """cgroupfs and sysfs semantics from the test kernel, but the swap calls the product's test mode makes."""

    def __init__(self, root: str | Path | None, **kwargs: object) -> None:
        super().__init__(root, **kwargs)  # type: ignore[arg-type]
        self._swap_syscall = KernelFS(self.root)._swap_syscall


SWAP_AND_CGROUP = """\
name: host-untouched
actions:
  - {kind: swap, enabled: false}
  - {kind: cgroup, name: tieremu-test, memory_max: 8G, memory_high: 6G, cpus: 0-3, mems: 0}
"""


@pytest.mark.parametrize("kernel", [KernelFS, FixtureKernel], ids=["plain-kernelfs", "with-cgroupfs"])
def test_lab_test_mode_apply_and_teardown_leave_the_host_untouched(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kernel: type) -> None:
    lab = make_lab(tmp_path)
    text = SWAP_AND_CGROUP if kernel is FixtureKernel else SWAP_AND_CGROUP.split("  - {kind: cgroup")[0]
    profile = lab.profile_file(text)
    real_calls: list[tuple[str, str]] = []
    monkeypatch.setattr(kernelfs, "real_swap_syscall", lambda op, dev, flags: real_calls.append((op, dev)))
    monkeypatch.setattr(lab_cli, "KernelFS", kernel)
    monkeypatch.delenv("TIEREMU_LAB_STATE", raising=False)  # the default state dir is what leaked before
    monkeypatch.delenv("TIEREMU_SYSFS_ROOT", raising=False)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    host_state = Path(DEFAULT_STATE)
    host_state_before = sorted(host_state.iterdir()) if host_state.is_dir() else None
    swaps_before = (lab.root / "proc/swaps").read_text()
    with listening() as audited:  # after the fixture's own set-up (a copy of the tree)
        code, out = _cli("lab", "apply", str(profile), "--sysfs-root", str(lab.root))
        assert code == 0, out
        assert (lab.root / "proc/swaps").read_text().count("\n") == 1  # every area off, in the fixture only
        assert (lab.root / "var/lib/tieremu/lab/host-untouched.json").is_file()  # the journal inside the fixture
        code, out = _cli("lab", "status", "--sysfs-root", str(lab.root))
        assert out.startswith("host-untouched: applied")
        code, out = _cli("lab", "teardown", str(profile), "--sysfs-root", str(lab.root))
        assert code == 0, out

    assert real_calls == [], "a swap call reached the real kernel"
    assert not [e for e in audited if e[0] == "ctypes.dlsym"], "libc's swapon/swapoff were looked up"
    assert any("var/lib/tieremu/lab" in p for _, p in audited)  # the hook sees the journal's writes
    assert outside(audited, tmp_path) == [], "written outside the fixture"
    assert (sorted(host_state.iterdir()) if host_state.is_dir() else None) == host_state_before
    # Every area back with its explicit priority (automatic ones are renumbered, as the kernel does).
    assert _areas(lab.root) == _areas_of(swaps_before)
    changes = [c for c in lab.changes() if not c.startswith(("dir var", "proc/swaps"))]
    assert changes == []


def _areas_of(text: str) -> set[tuple[str, str, int | None]]:
    return {(a.device, a.type, a.priority if a.priority >= 0 else None) for a in parse_swaps(text)}


def _areas(root: Path) -> set[tuple[str, str, int | None]]:
    return _areas_of((root / "proc/swaps").read_text())


def test_lab_apply_rolls_back_on_sighup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    lab: Lab = make_lab(tmp_path)
    before = signal.getsignal(signal.SIGHUP)
    profile = load_profile(lab.profile_file(SWAP_AND_CGROUP))
    count = 0

    def hook(op: str, target: str, value: str) -> None:
        nonlocal count
        count += 1
        if count == 3:  # a dropped ssh session in the middle of the apply
            os.kill(os.getpid(), signal.SIGHUP)

    lab.fs.hook = hook
    with pytest.raises(Terminated, match="SIGHUP"):
        Applier(profile, lab.fs, lab.state).apply()
    assert count > 3 and lab.changes() == []
    assert signal.getsignal(signal.SIGHUP) is before


# ---- 2. a file tier never follows a planted symlink ---------------------------------------------------------

def test_a_file_tier_refuses_a_planted_symlink_and_leaves_its_target(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    directory = tmp_path / "ft"
    directory.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("keep\n")
    # The old predictable name, as the audit planted it, with `tieremu check` run in this process.
    (directory / f"tieremu-check-{os.getpid()}.blocks").symlink_to(victim)
    tier_map = tmp_path / "ft.yaml"
    tier_map.write_text(f"name: ft\ntiers:\n  - {{name: dram, nodes: [0]}}\n  - {{name: ssd, kind: file, path: "
                        f"{directory}}}\n")
    _cli("check", "--tiers", str(tier_map))
    assert victim.read_text() == "keep\n"
    # And at the exact name the tier would use now: refused, not written through.
    monkeypatch.setattr(files.secrets, "token_hex", lambda n: "feedbeef")
    (directory / f"tieremu-kv-{os.getpid()}-feedbeef.blocks").symlink_to(victim)
    with pytest.raises(FileTierError, match="already exists"):
        BlockFile(directory, 4096, 4)
    assert victim.read_text() == "keep\n"


# ---- 3. atomic writes never replace what is not a regular file -----------------------------------------------

@pytest.mark.parametrize("kind", ["device", "fifo", "symlink"])
def test_generate_trace_refuses_to_replace_a_device_fifo_or_symlink(tmp_path: Path, kind: str) -> None:
    target = tmp_path / "null"
    victim = tmp_path / "victim"
    victim.write_text("keep\n")
    if kind == "device":
        if not ROOT:
            pytest.skip("mknod needs root")
        os.mknod(target, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    elif kind == "fifo":
        os.mkfifo(target)
    else:
        target.symlink_to(victim)
    mode = os.lstat(target).st_mode
    code, out = _cli("generate-trace", "--out", str(tmp_path), "--name", target.name, "--requests", "2")
    assert code == 2 and "not a regular file" in out and "Traceback" not in out
    assert os.lstat(target).st_mode == mode and victim.read_text() == "keep\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []  # no temporary left behind


def test_atomic_write_replaces_a_regular_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "t.jsonl"
    target.write_text("old\n")
    write_trace(target, [Request(0, 10, 2, (1, 2))])
    assert read_trace(target) == [Request(0, 10, 2, (1, 2))]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.jsonl"]


# ---- 4. --resume never attaches old results to a changed experiment ---------------------------------------------

def test_run_ids_change_with_the_seed_the_tier_map_contents_and_the_trace_contents(tmp_path: Path) -> None:
    tiers = tmp_path / "tiers.yaml"
    tiers.write_text(TIERS.read_text())
    trace = tmp_path / "trace.jsonl"
    write_trace(trace, [Request(i * 10, 600, 4, (i, i + 1)) for i in range(20)])
    body = SYNTHETIC + f"  - {{kind: replay, trace: {trace}, policies: [lru], max_requests: 10}}\n"

    def ids(extra: str = "") -> set[str]:
        return {r.run_id for r in expand(load_experiment(_spec(tmp_path, extra + body, tiers=tiers)))}

    first = ids()
    assert ids() == first  # stable
    assert not ids("seed: 999\n") & first  # the audit's case: the spec's seed
    tiers.write_text(TIERS.read_text() + "# edited: the same path, other contents\n")
    assert not ids() & first
    tiers.write_text(TIERS.read_text())
    assert ids() == first
    write_trace(trace, [Request(i * 10, 600, 4, (i, i + 2)) for i in range(20)])
    changed = ids()
    replay = {i for i in first if i.startswith("replay")}
    assert replay and not replay & changed and (first - replay) <= changed  # only the trace's runs change


def test_resume_after_adding_a_seed_runs_everything_again(tmp_path: Path) -> None:
    spec = _spec(tmp_path, SYNTHETIC)
    first = run_experiment(load_experiment(spec), tmp_path / "out", report=False)
    spec.write_text(spec.read_text() + "seed: 999\n")
    second = run_experiment(load_experiment(spec), tmp_path / "out", resume=first.path, report=False)
    assert second.records and not any(r.reused for r in second.records)


# ---- 5. result folders are locked, and --resume takes only a result folder -----------------------------------

def test_resume_refuses_a_folder_that_is_not_a_result_folder_and_leaves_it(tmp_path: Path) -> None:
    spec = load_experiment(_spec(tmp_path, SYNTHETIC))
    for mydata in (tmp_path / "mydata", tmp_path / "out" / "hard" / "mydata"):
        mydata.mkdir(parents=True)
        (mydata / "keep").write_text("data\n")
        with pytest.raises(TieremuError, match="--resume"):
            run_experiment(spec, tmp_path / "out", resume=mydata, report=False)
        assert sorted(p.name for p in mydata.iterdir()) == ["keep"] and (mydata / "keep").read_text() == "data\n"
        assert not mydata.with_name("mydata.partial").exists()


def test_a_result_folder_is_locked_while_a_run_holds_it(tmp_path: Path) -> None:
    with ResultDir(tmp_path, "hard", "t1") as out:
        out.write_json("manifest.json", {"tieremu_version": "x", "extra": {"experiment": "hard"}})
        with pytest.raises(ResultError, match="in use by another tieremu run"):
            ReopenedResultDir(out.path, "hard")  # a concurrent --resume
        assert out.path.name == "t1.partial"  # not renamed under the running run
    reopened = ReopenedResultDir(tmp_path / "hard" / "t1", "hard")  # free again once the run is done
    reopened.close()


def test_two_runs_started_in_the_same_second_get_two_folders(tmp_path: Path) -> None:
    with ResultDir(tmp_path, "hard", "t1") as a, ResultDir(tmp_path, "hard", "t1") as b:
        assert a.path != b.path
    assert sorted(p.name for p in (tmp_path / "hard").iterdir()) == ["t1", "t1-1"]


# ---- 6. inputs that hung ---------------------------------------------------------------------------------------

def _alias_bomb(path: Path) -> Path:
    lines = ["a0: &a0 lol"] + [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 10)]
    path.write_text("\n".join(lines) + "\nname: x\ntiers:\n  - {name: *a9, nodes: [0]}\n")
    return path


def test_an_alias_bomb_is_refused_at_once(tmp_path: Path) -> None:
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="aliases") as err:
        load_tier_map(_alias_bomb(tmp_path / "bomb.yaml"))
    assert time.perf_counter() - start < 2 and len(str(err.value)) < 300
    code, out = _cli("check", "--tiers", str(tmp_path / "bomb.yaml"))
    assert code == 2 and "aliases" in out


def test_a_few_aliases_are_fine_and_a_long_value_is_shown_short(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text("name: x\nd: &d [0]\ntiers:\n  - {name: dram, nodes: *d}\n")
    with pytest.raises(ConfigError, match="d: unknown key"):
        load_tier_map(path)
    path.write_text("name: x\ntiers:\n  - {name: [" + ",".join(["abcdefgh"] * 5000) + "], nodes: [0]}\n")
    with pytest.raises(ConfigError, match=r"tiers\[0\]\.name: expected str") as err:
        load_tier_map(path)
    assert len(str(err.value)) < 300


@pytest.mark.parametrize("source", ["/dev/zero", "fifo", "big"])
def test_configs_that_never_end_or_are_huge_are_refused(tmp_path: Path, source: str) -> None:
    if source == "fifo":
        path = tmp_path / "fifo"
        os.mkfifo(path)  # no writer: opening it would wait forever
    elif source == "big":
        path = tmp_path / "big.yaml"
        path.write_text("name: x\n" + "#" * (2 << 20) + "\n")
    else:
        path = Path(source)
    with pytest.raises(ConfigError, match=r"not a regular file|larger than"):
        load_tier_map(path)
    if source != "big":  # a trace may be big; it must still be a regular file
        with pytest.raises(TraceError, match=r"not a regular file"):
            read_trace(path)


def test_absurd_repetitions_and_sweeps_are_refused_before_expansion(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"repetitions: 1000000000000: must be an integer >= 1"):
        load_experiment(_spec(tmp_path, "repetitions: 1000000000000\n" + SYNTHETIC))
    axis = ", ".join(str(256 + i) for i in range(500))
    spec = load_experiment(_spec(tmp_path, "repetitions: 1000\n" + SYNTHETIC +
                                 f"    sweep: {{fast_capacity_mib: [{axis}]}}\n"))
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="expands to 1500000 runs"):
        expand(spec)
    assert time.perf_counter() - start < 1


# ---- 8. duplicate keys ---------------------------------------------------------------------------------------

def test_duplicate_keys_and_nodes_are_refused(tmp_path: Path) -> None:
    tiers = tmp_path / "t.yaml"
    tiers.write_text("name: x\ntiers:\n  - name: dram\n    nodes: [0]\n    nodes: [5]\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'nodes' \(first on line 4\)"):
        load_tier_map(tiers)
    tiers.write_text("name: x\ntiers:\n  - {name: dram, nodes: [0, 0, 0]}\n")
    with pytest.raises(ConfigError, match=r"tiers\[0\]\.nodes: \[0, 0, 0\]: a node is listed twice"):
        load_tier_map(tiers)
    with pytest.raises(ConfigError, match="duplicate key 'jobs'"):
        load_experiment(_spec(tmp_path, SYNTHETIC + "jobs:\n  - kind: probe\n"))


# ---- 9. infinite and absurd numbers ----------------------------------------------------------------------------

@pytest.mark.parametrize(("setting", "message"), [
    ("emulate: {latency_ratio: .inf}", r"emulate\.latency_ratio: inf is not a finite number"),
    ("emulate: {latency_ratio: .nan}", r"emulate\.latency_ratio: nan is not a finite number"),
    ("emulate: {latency_ratio: 1.0e+300}", r"emulate\.latency_ratio: 1e\+300: must be a finite number > 0 and <= 1000"),
    ("emulate: {bandwidth_gbps: 1.0e+9}", r"emulate\.bandwidth_gbps: 1000000000.0: must be"),
    ("capacity_mib: 1000000000000000000000", r"capacity_mib: 1000000000000000000000: must be an integer >= 1"),
])
def test_infinite_and_absurd_numbers_in_a_tier_map_are_refused(tmp_path: Path, setting: str, message: str) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(f"name: x\ntiers:\n  - {{name: dram, nodes: [0]}}\n  - {{name: cxl, nodes: [1], "
                    f"allow_emulation: true, {setting}}}\n")
    with pytest.raises(ConfigError, match=message):
        load_tier_map(path)


@pytest.mark.parametrize("args", [
    ["generate-trace", "--out", "OUT", "--requests", "2", "--rate", "nan"],
    ["replay", "TRACE", "--tiers", str(TIERS), "--policy", "lru", "--block-mib", "nan"],
    ["replay", "TRACE", "--tiers", str(TIERS), "--policy", "lru", "--epoch-ms", "inf"],
    ["daemon", "--pid", "2", "--policy", "lru", "--epoch-ms", "nan"],
    ["vm", "run", "--timeout", "nan", "true"],
])
def test_cli_numbers_must_be_finite(tmp_path: Path, args: list[str]) -> None:
    trace = tmp_path / "t.jsonl"
    write_trace(trace, [Request(0, 10, 2, (1,))])
    args = [str(trace) if a == "TRACE" else str(tmp_path / "out.jsonl") if a == "OUT" else a for a in args]
    code, out = _cli(*args)
    assert code == 2 and "is not finite" in out, out
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize("bad", [0.0, math.nan, math.inf, -5.0])
def test_a_cached_calibration_with_zero_or_nan_is_not_trusted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               bad: float) -> None:
    path = tmp_path / "cal.json"
    monkeypatch.setattr(calibrate, "cache_path", lambda key=None: path)
    good = {"machine": calibrate.machine_key(), "created_utc": "now", "node": 0, "latency_ns": 100.0,
            "bandwidth_gbps": {"read": 20.0, "write": 10.0, "copy": 10.0}, "latency_by_node": {"0": 100.0},
            "read_gbps_by_node": {"0": 20.0}}
    path.write_text(json.dumps(good))
    assert calibrate.load_cached() is not None
    path.write_text(json.dumps(good | {"latency_ns": bad}))
    assert calibrate.load_cached() is None
    path.write_text(json.dumps(good | {"bandwidth_gbps": {"read": bad, "write": 10.0, "copy": 10.0}}))
    assert calibrate.load_cached() is None


# ---- 10. clear errors, never tracebacks -------------------------------------------------------------------------

def test_non_utf8_configs_and_traces_get_a_clear_error(tmp_path: Path) -> None:
    junk = tmp_path / "junk.yaml"
    junk.write_bytes(b"name: x\n\xd9\xff\xfe garbage\n")
    code, out = _cli("check", "--tiers", str(junk))
    assert code == 2 and "not UTF-8 text (byte 8 is 0xd9)" in out
    trace = tmp_path / "t.jsonl"
    trace.write_bytes(b'{"timestamp": 0, "input_length": 1, "output_length": 1, "hash_ids": [1]}\n\xff\n')
    with pytest.raises(TraceError, match=r"t\.jsonl:2: not UTF-8 text"):
        read_trace(trace)


def _full_disk(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every file tieremu creates lands on /dev/full: the kernel answers its writes with ENOSPC."""
    def create(path: str | os.PathLike[str], flags: int = os.O_RDWR, mode: int = 0o600) -> int:
        return os.open("/dev/full", os.O_WRONLY)

    monkeypatch.setattr(safefile, "create_exclusive", create)


def test_a_full_disk_is_a_clear_error_and_the_run_error_survives(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    out = ResultDir(tmp_path, "hard", "t1")
    _full_disk(monkeypatch)
    with pytest.raises(ResultError, match="No space left on device"):
        out.write_text("a.txt", "x")
    with pytest.raises(RuntimeError, match="the run's own failure"), out:
        raise RuntimeError("the run's own failure")  # error.txt cannot be written: the folder still says failed
    assert (tmp_path / "hard" / "t1.failed").is_dir()
    assert [p.name for p in (tmp_path / "hard" / "t1.failed").iterdir()] == []  # no temporary left
    code, text = _cli("generate-trace", "--out", str(tmp_path), "--name", "t.jsonl", "--requests", "2")
    assert code == 2 and "No space left on device" in text


def test_a_read_only_out_is_a_clear_error(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tieremu-test", str(ro)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a read-only filesystem here")
    try:
        spec = _spec(tmp_path, SYNTHETIC)
        code, out = _cli("run", str(spec), "--out", str(ro))
        assert code == 2 and "Read-only file system" in out and "Traceback" not in out, out
    finally:
        subprocess.run(["umount", str(ro)], check=True)


def test_a_corrupt_status_json_on_resume_runs_that_run_again(tmp_path: Path) -> None:
    spec = load_experiment(_spec(tmp_path, SYNTHETIC))
    first = run_experiment(spec, tmp_path / "out", report=False)
    victim = first.records[0].run_id
    (first.path / "runs" / victim / "status.json").write_bytes(b"\x00{not json")
    second = run_experiment(spec, tmp_path / "out", resume=first.path, report=False)
    by_id = {r.run_id: r for r in second.records}
    assert not by_id[victim].reused and by_id[victim].status == "done"
    assert all(r.reused for i, r in by_id.items() if i != victim)


@pytest.mark.parametrize(("module", "message"), [
    ("raise RuntimeError('boom at import')\n", r"cannot be loaded: RuntimeError: boom at import"),
    ("class P:\n    pass\n", r"is not a subclass of tieremu\.policy\.base\.Policy"),
])
def test_a_user_policy_that_raises_on_import_or_is_no_policy_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, module: str, message: str) -> None:
    name = f"userpol_{abs(hash(module)) % 10**8}"
    (tmp_path / f"{name}.py").write_text(module)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match=r"jobs\[0\]\.policies\[0\]: policy '" + name + ":P' " + message):
        load_experiment(_spec(tmp_path, "jobs:\n  - {kind: replay, generate: {kind: agent, requests: 5, seed: 1}, "
                                        f"policies: ['{name}:P']}}\n"))


def test_a_user_job_that_raises_on_import_is_refused_with_its_error(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "userjob_boom.py").write_text("raise ValueError('bad user job')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match=r"'userjob_boom:J' cannot be loaded: ValueError: bad user job"):
        load_experiment(_spec(tmp_path, "jobs:\n  - kind: userjob_boom:J\n"))


# ---- also: the daemon's targets, broken topologies ---------------------------------------------------------------

@pytest.mark.parametrize("pid", [1, os.getpid()], ids=["init", "itself"])
def test_the_daemon_refuses_pid_1_and_itself(pid: int) -> None:
    with pytest.raises(AttachError, match=r"pid 1 is init|this daemon itself"):
        attach(AttachConfig(pid=pid, policy="lru"))


@pytest.mark.parametrize(("file", "text", "message"), [
    ("node0/distance", "-10 21\n", "each must be 1..255"),
    ("online", "\n", "no NUMA node is online"),
])
def test_topologies_with_negative_distances_or_no_online_node_are_refused(tmp_path: Path, file: str, text: str,
                                                                           message: str) -> None:
    import shutil

    root = tmp_path / "root"
    shutil.copytree(fixture_root("two-socket-cpuless"), root, symlinks=True)
    (root / "sys/devices/system/node" / file).write_text(text)
    with pytest.raises(TopologyError, match=message):
        discover(root)


# ---- 7. processes left behind -----------------------------------------------------------------------------------

def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat_text = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat_text.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait(condition: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return bool(condition())  # type: ignore[operator]


def test_die_with_parent_takes_the_child_down_with_a_killed_parent(tmp_path: Path) -> None:
    child = ("import os, sys, time; from tieremu.runner.worker import die_with_parent; "
             "die_with_parent(int(sys.argv[1])); print('ready', flush=True); time.sleep(60)")
    parent = ("import os, subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', sys.argv[1], "
              "str(os.getpid())], stdout=subprocess.PIPE, text=True); assert p.stdout.readline() == 'ready\\n'; "
              "print(p.pid, flush=True); time.sleep(60)")
    proc = subprocess.Popen([PYTHON, "-c", parent, child], stdout=subprocess.PIPE, text=True,
                            env=os.environ | {"PYTHONPATH": str(REPO)})
    worker = int(proc.stdout.readline())  # type: ignore[union-attr]
    assert _alive(worker)
    proc.kill()
    proc.wait()
    assert _wait(lambda: not _alive(worker), 10), "the child outlived its SIGKILLed parent"


def test_die_with_parent_exits_when_the_parent_is_already_gone() -> None:
    # The parent named is not this process's parent (as after the parent died before the prctl): exit at once.
    result = subprocess.run([PYTHON, "-c", "from tieremu.runner.worker import die_with_parent; "
                             "die_with_parent(1); print('survived')"], capture_output=True, text=True,
                            env=os.environ | {"PYTHONPATH": str(REPO)})
    assert result.returncode == 1 and "survived" not in result.stdout
    assert callable(die_with_parent)


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
def test_no_sweep_worker_outlives_the_runner(tmp_path: Path, how: signal.Signals) -> None:
    spec = _spec(tmp_path, "jobs:\n  - kind: synthetic\n    policies: []\n    tokens: 4\n    crash: hang\n"
                           "run_timeout_s: 300\n")
    out = tmp_path / "out"
    runner = subprocess.Popen([PYTHON, "-c", "from tieremu.cli import main; main()", "run", str(spec), "--out",
                               str(out)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=os.environ | {"PYTHONPATH": str(REPO)})
    try:
        assert _wait(lambda: list(out.glob("hard/*/runs/*/worker.log")), 60), "no run started"
        workers = _children(runner.pid)
        assert workers and all(_alive(w) for w in workers)
        runner.send_signal(how)
        runner.wait(30)
        assert _wait(lambda: not any(_alive(w) for w in workers), 10), "a worker outlived the runner"
        if how == signal.SIGTERM:  # handled: the folder says failed, the message names signal and folder
            assert runner.returncode == 128 + signal.SIGTERM  # as a shell reports a death by SIGTERM
            folders = list((out / "hard").iterdir())
            assert [p.name.endswith(".failed") for p in folders] == [True]
            stderr = runner.stderr.read()  # type: ignore[union-attr]
            assert "Traceback" not in stderr and "Aborted" not in stderr
            assert "tieremu: run stopped by SIGTERM" in stderr and str(folders[0]) in stderr and "--resume" in stderr
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait()


def test_safe_writes_refuse_links_everywhere(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep\n")
    link = tmp_path / "link"
    link.symlink_to(victim)
    with pytest.raises(UnsafeFileError, match="symbolic link"):
        atomic_write(link, "x")
    with pytest.raises(UnsafeFileError):
        safefile.open_append(link)
    with pytest.raises(UnsafeFileError):
        os.close(safefile.create_exclusive(link))
    assert victim.read_text() == "keep\n" and link.is_symlink()
    assert snapshot(tmp_path).files["victim"] == b"keep\n"
