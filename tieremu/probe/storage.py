"""Storage-tier characterization with fio: random and sequential reads and writes against a directory.

fio runs as a subprocess (argv list, never a shell) with `--output-format=json`; its JSON is read directly
because no maintained parser exists. Each job is its own fio run so that progress can be reported, a Ctrl-C
stops after the current job, and one bad combination names itself. Every run targets one test file inside
the given directory, claimed with O_EXCL so a user's file is never overwritten, and removed afterwards
whatever happens.

Latency figures: fio's `lat_ns` is total latency (submission + completion); `clat_ns` is completion
latency only. We ask fio for total-latency percentiles (`--lat_percentiles=1`) and keep the completion
ones too; every figure below says which one it is.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import mmap
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tieremu.errors import ProbeError
from tieremu.record.stats import LoadMeter, MachineLoad

INSTALL_HINT = "install it with `apt-get install fio` (or run scripts/bootstrap.sh)"

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

FULL_RW = ("randread", "read", "randwrite", "write")
FULL_BLOCK_SIZES = (4 * KiB, 16 * KiB, 64 * KiB, 256 * KiB, 1 * MiB)
FULL_IODEPTHS = (1, 2, 4, 8, 16, 32)

READ_RW = frozenset({"read", "randread"})
WRITE_RW = frozenset({"write", "randwrite", "trimwrite"})
MIXED_RW = frozenset({"rw", "readwrite", "randrw"})

# fio treats k/m/g as powers of 1024 unless kb_base=1000 is set, which our runs never do.
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(?:i?b)?\s*$", re.IGNORECASE)
_SIZE_SCALE = {"": 1, "k": KiB, "m": MiB, "g": GiB, "t": GiB << 10, "p": GiB << 20}


@dataclass(frozen=True)
class JobSpec:
    """One fio job to run: access pattern, block size in bytes, queue depth."""

    rw: str
    bs: int
    iodepth: int

    @property
    def name(self) -> str:
        return f"{self.rw}-{_size_label(self.bs)}-qd{self.iodepth}"


@dataclass(frozen=True)
class StoragePlan:
    """The jobs of one storage probe and how long each runs; the test file size in bytes."""

    jobs: tuple[JobSpec, ...]
    file_size: int
    runtime_s: float
    ramp_s: float

    @property
    def estimated_s(self) -> float:
        return len(self.jobs) * (self.runtime_s + self.ramp_s)


# Quick mode fits in ~20 s on a 2-vCPU VM: the corners that matter for KV offload (small random
# reads at low and high depth, large sequential transfers both ways, small random writes).
QUICK_PLAN = StoragePlan(
    jobs=(
        JobSpec("randread", 4 * KiB, 1),
        JobSpec("randread", 4 * KiB, 32),
        JobSpec("read", 1 * MiB, 8),
        JobSpec("randwrite", 4 * KiB, 1),
        JobSpec("write", 1 * MiB, 8),
    ),
    file_size=128 * MiB,
    runtime_s=2.0,
    ramp_s=0.5,
)

FULL_PLAN = StoragePlan(
    jobs=tuple(JobSpec(rw, bs, qd) for rw in FULL_RW for bs in FULL_BLOCK_SIZES for qd in FULL_IODEPTHS),
    file_size=1 * GiB,
    runtime_s=4.0,
    ramp_s=1.0,
)


@dataclass(frozen=True)
class FioJob:
    """One direction (read or write section) of one job in fio's JSON output.

    `lat_*` figures are total latency (fio `lat_ns`: submission + completion); `clat_*` are completion
    latency (fio `clat_ns`). Total-latency percentiles exist only when fio ran with lat_percentiles=1.
    """

    name: str
    rw: str  # the job's rw option (randread, write, randrw, ...)
    direction: str  # which section of the job these figures come from: "read" or "write"
    bs: int | None  # bytes; None when the job used a range or split fio's options do not name
    iodepth: int
    ioengine: str | None
    direct: bool
    bw_bytes: int  # bytes per second
    iops: float
    io_bytes: int
    total_ios: int
    runtime_ms: int
    lat_mean_ns: float
    lat_min_ns: float
    lat_max_ns: float
    lat_p50_ns: float | None
    lat_p99_ns: float | None
    lat_p999_ns: float | None
    clat_mean_ns: float
    clat_p50_ns: float | None
    clat_p99_ns: float | None
    clat_p999_ns: float | None
    error: int = 0

    @property
    def mb_per_s(self) -> float:
        return self.bw_bytes / 1e6

    @property
    def percentiles_of(self) -> str:
        """Which latency `p50_ns`/`p99_ns`/`p999_ns` describe: "total" when fio gave it, else "completion"."""
        return "total" if self.lat_p50_ns is not None else "completion"

    @property
    def p50_ns(self) -> float | None:
        return self.lat_p50_ns if self.lat_p50_ns is not None else self.clat_p50_ns

    @property
    def p99_ns(self) -> float | None:
        return self.lat_p99_ns if self.lat_p50_ns is not None else self.clat_p99_ns

    @property
    def p999_ns(self) -> float | None:
        return self.lat_p999_ns if self.lat_p50_ns is not None else self.clat_p999_ns


@dataclass
class StorageResult:
    """Everything one storage probe measured, and the context needed to read it honestly."""

    directory: str
    fstype: str | None
    mount_point: str | None
    device: str | None
    direct: bool
    direct_note: str  # why I/O is buffered, or "" when O_DIRECT is used
    fio_version: str
    ioengine: str
    file_size: int
    runtime_s: float
    ramp_s: float
    quick: bool
    points: list[FioJob] = field(default_factory=list)
    load: MachineLoad | None = None
    duration_s: float = 0.0
    notes: list[str] = field(default_factory=list)
    origin: str = "measured"

    def to_dict(self) -> dict[str, object]:
        out = asdict(self)
        out["points"] = [asdict(p) | {"mb_per_s": p.mb_per_s, "percentiles_of": p.percentiles_of}
                         for p in self.points]
        out["load"] = self.load.to_dict() if self.load is not None else None
        return out


# ---------------------------------------------------------------------------------------------- parsing


def parse_fio_json(text: str) -> list[FioJob]:
    """The read and write sections of every job in fio's `--output-format=json` output.

    A section is kept when the job's rw option names its direction or when it did any I/O, so a pure
    read job yields one FioJob and a randrw job yields two.
    """
    data = _load_json(text)
    jobs = data.get("jobs")
    if not isinstance(jobs, list):
        raise ProbeError("fio JSON has no 'jobs' list; is this fio --output-format=json output?")
    global_opts = data.get("global options") or {}
    out: list[FioJob] = []
    for job in jobs:
        opts = {**global_opts, **(job.get("job options") or {})}
        rw = str(opts.get("rw", opts.get("readwrite", "read")))
        base = rw.split(":")[0]  # "randread:8" means 8 sequential I/Os between random seeks
        bs_opt = str(opts.get("bs", opts.get("blocksize", "4k")))
        for direction, index in (("read", 0), ("write", 1)):
            section = job.get(direction)
            if not isinstance(section, dict):
                continue
            named = (base in READ_RW and direction == "read") or (base in WRITE_RW and direction == "write") \
                or base in MIXED_RW
            if not named and not section.get("total_ios"):
                continue
            out.append(_fio_job(job, opts, rw, direction, _bs_for(bs_opt, index), section))
    return out


def _load_json(text: str) -> dict:
    # fio sometimes prints notes ("note: both iodepth >= 1 and synchronous I/O engine ...") on stdout
    # before the JSON document, so start at the first line that opens an object.
    match = re.search(r"^\{", text, re.MULTILINE)
    if match is None:
        raise ProbeError(f"fio printed no JSON; its output began: {text[:200]!r}")
    try:
        data = json.loads(text[match.start():])
    except json.JSONDecodeError as exc:
        raise ProbeError(f"fio's JSON output could not be parsed ({exc}); it began: {text[:200]!r}") from None
    if not isinstance(data, dict):
        raise ProbeError("fio's JSON output is not an object")
    return data


def _fio_job(job: dict, opts: dict, rw: str, direction: str, bs: int | None, section: dict) -> FioJob:
    lat = section.get("lat_ns") or {}
    clat = section.get("clat_ns") or {}
    lat_pct = lat.get("percentile") or {}
    clat_pct = clat.get("percentile") or {}
    return FioJob(
        name=str(job.get("jobname", "")),
        rw=rw,
        direction=direction,
        bs=bs,
        iodepth=int(_size(str(opts.get("iodepth", "1"))) or 1),
        ioengine=opts.get("ioengine"),
        direct=_truthy(opts.get("direct", opts.get("buffered") == "0")),
        bw_bytes=int(section.get("bw_bytes", 0)),
        iops=float(section.get("iops", 0.0)),
        io_bytes=int(section.get("io_bytes", 0)),
        total_ios=int(section.get("total_ios", 0)),
        runtime_ms=int(section.get("runtime", 0)),
        lat_mean_ns=float(lat.get("mean", 0.0)),
        lat_min_ns=float(lat.get("min", 0.0)),
        lat_max_ns=float(lat.get("max", 0.0)),
        lat_p50_ns=_percentile(lat_pct, 50.0),
        lat_p99_ns=_percentile(lat_pct, 99.0),
        lat_p999_ns=_percentile(lat_pct, 99.9),
        clat_mean_ns=float(clat.get("mean", 0.0)),
        clat_p50_ns=_percentile(clat_pct, 50.0),
        clat_p99_ns=_percentile(clat_pct, 99.0),
        clat_p999_ns=_percentile(clat_pct, 99.9),
        error=int(job.get("error", 0)),
    )


def _percentile(table: dict, p: float) -> float | None:
    # fio's keys are "%f"-formatted ("99.900000"); compare as numbers, not strings.
    for key, value in table.items():
        with contextlib.suppress(ValueError):
            if math.isclose(float(key), p, abs_tol=1e-6):
                return float(value)
    return None


def _truthy(value: object) -> bool:
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() in {"1", "true", "yes", "on"}


def _size(text: str) -> int | None:
    match = _SIZE_RE.match(text)
    if match is None:
        return None
    return int(float(match.group(1)) * _SIZE_SCALE[match.group(2).lower()])


def _bs_for(bs_opt: str, index: int) -> int | None:
    # "bs=4k,64k" gives reads 4k and writes 64k; a single value applies to both.
    parts = [p for p in bs_opt.split(",")]
    text = parts[index] if index < len(parts) and parts[index] else parts[0]
    return _size(text)


def _size_label(n: int) -> str:
    for unit, scale in (("g", GiB), ("m", MiB), ("k", KiB)):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{unit}"
    return str(n)


# ---------------------------------------------------------------------------------------------- environment


def find_fio(fio_bin: str | os.PathLike[str] | None = None) -> str:
    """The fio executable to run, or ProbeError saying how to install it."""
    name = os.fspath(fio_bin) if fio_bin is not None else "fio"
    path = shutil.which(name)
    if path is None:
        raise ProbeError(f"fio not found ({name!r} is not an executable on PATH); {INSTALL_HINT}")
    return path


def fio_version(fio: str) -> str:
    proc = _run_small([fio, "--version"])
    if proc.returncode != 0 or not proc.stdout.strip():
        raise ProbeError(f"{fio} --version failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}")
    return proc.stdout.strip().splitlines()[0]


def pick_ioengine(fio: str) -> str:
    """libaio when this fio has it (Debian builds it in; it needs no extra package), else psync."""
    proc = _run_small([fio, "--enghelp=libaio"])
    return "libaio" if proc.returncode == 0 else "psync"


def _run_small(argv: list[str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except OSError as exc:
        raise ProbeError(f"could not run {argv[0]}: {exc}; {INSTALL_HINT}") from None


def check_directory(directory: Path) -> Path:
    """The directory, resolved, once it is known to exist and accept a new file; else ProbeError naming it."""
    if not directory.exists():
        raise ProbeError(f"storage directory {directory} does not exist; create it or name the NVMe tier's mount")
    if not directory.is_dir():
        raise ProbeError(f"storage path {directory} is not a directory")
    resolved = directory.resolve()
    # Try a real file: as root, os.access says yes even where a read-only mount would refuse.
    probe = resolved / f".tieremu-probe-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except OSError as exc:
        raise ProbeError(f"storage directory {directory} is not writable: {exc.strerror}") from None
    os.close(fd)
    probe.unlink()
    return resolved


def direct_io_supported(directory: Path) -> tuple[bool, str]:
    """Whether files in directory accept O_DIRECT, with the reason when not.

    Opening is not enough on every filesystem (some accept the flag and fail the first I/O), so one
    aligned block is written as well.
    """
    if not hasattr(os, "O_DIRECT"):
        return False, "this platform has no O_DIRECT"
    path = directory / f".tieremu-direct-{os.getpid()}-{secrets.token_hex(4)}"
    fd = -1
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_DIRECT, 0o600)
        block = mmap.mmap(-1, 4096)  # page aligned, as O_DIRECT requires
        try:
            os.write(fd, block)
        finally:
            block.close()
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return False, (f"the filesystem refuses O_DIRECT ({errno.errorcode.get(exc.errno, exc.errno)}): "
                           "I/O is buffered, so figures include the page cache")
        raise ProbeError(f"cannot create a test file in {directory}: {exc.strerror}") from None
    finally:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    return True, ""


@dataclass(frozen=True)
class MountInfo:
    mount_point: str | None
    fstype: str | None
    device: str | None


def mount_of(directory: Path, mounts: str = "/proc/mounts") -> MountInfo:
    """The mount holding directory (longest mount point that prefixes it) and its block device, if any."""
    target = os.path.realpath(directory)
    best: tuple[str, str, str] | None = None
    try:
        with open(mounts) as f:
            lines = f.read().splitlines()
    except OSError:
        lines = []
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        source, point, fstype = (_unescape_mount(x) for x in fields[:3])
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        # Later lines win on ties: they are mounted over the earlier ones.
        if inside and (best is None or len(point) >= len(best[1])):
            best = (source, point, fstype)
    if best is None:
        return MountInfo(None, None, None)
    source, point, fstype = best
    return MountInfo(point, fstype, _block_device(directory) or (source if source.startswith("/dev/") else None))


def _unescape_mount(text: str) -> str:
    # /proc/mounts escapes space, tab, newline and backslash as octal.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def _block_device(directory: Path) -> str | None:
    # st_dev names the real device even when /proc/mounts says /dev/root or a mapper alias.
    dev = os.stat(directory).st_dev
    uevent = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/uevent")
    try:
        for line in uevent.read_text().splitlines():
            if line.startswith("DEVNAME="):
                return "/dev/" + line.split("=", 1)[1]
    except OSError:
        return None
    return None


# ---------------------------------------------------------------------------------------------- running


def fio_argv(fio: str, path: Path, spec: JobSpec, *, ioengine: str, direct: bool, file_size: int,
             runtime_s: float, ramp_s: float) -> list[str]:
    """The fio command line for one job on the test file at path."""
    argv = [
        fio,
        f"--name={spec.name}",
        # fio splits filenames on ':'; escape them so a directory with a colon stays one file.
        f"--filename={str(path).replace(':', chr(92) + ':')}",
        f"--size={file_size}",
        f"--rw={spec.rw}",
        f"--bs={spec.bs}",
        f"--iodepth={spec.iodepth}",
        f"--ioengine={ioengine}",
        f"--direct={int(direct)}",
        "--time_based",
        f"--runtime={max(1, round(runtime_s * 1000))}ms",
        *([f"--ramp_time={round(ramp_s * 1000)}ms"] if ramp_s > 0 else []),
        "--group_reporting",
        "--lat_percentiles=1",
        "--percentile_list=50:99:99.9",
        "--eta=never",
        "--output-format=json",
    ]
    return argv


def run_storage(
    directory: Path,
    *,
    quick: bool,
    progress: Callable[[str], None] | None = None,
    fio_bin: str | os.PathLike[str] | None = None,
    plan: StoragePlan | None = None,
) -> StorageResult:
    """Run fio's job grid (quick: 5 jobs, ~15 s) on a test file in directory and return every figure.

    `fio_bin` overrides the fio executable and `plan` the jobs, file size and timing.
    """
    say = progress or (lambda _msg: None)
    fio = find_fio(fio_bin)
    version = fio_version(fio)
    directory = check_directory(Path(directory))
    plan = plan or (QUICK_PLAN if quick else FULL_PLAN)
    direct, direct_note = direct_io_supported(directory)
    ioengine = pick_ioengine(fio)
    notes: list[str] = []
    if direct_note:
        notes.append(direct_note)
    if ioengine != "libaio":
        notes.append(f"fio has no libaio here; {ioengine} is synchronous, so queue depths above 1 behave as 1")
    file_size = _fit_file_size(directory, plan.file_size, notes)
    mount = mount_of(directory)
    result = StorageResult(
        directory=str(directory), fstype=mount.fstype, mount_point=mount.mount_point, device=mount.device,
        direct=direct, direct_note=direct_note, fio_version=version, ioengine=ioengine, file_size=file_size,
        runtime_s=plan.runtime_s, ramp_s=plan.ramp_s, quick=quick, notes=notes,
    )
    say(f"fio on {directory} ({mount.fstype or 'unknown fs'}, {'O_DIRECT' if direct else 'buffered'}, "
        f"{ioengine}): {len(plan.jobs)} jobs, about {plan.estimated_s:.0f} s")
    path = _claim_test_file(directory)
    started = time.monotonic()
    meter = LoadMeter()
    try:
        for i, spec in enumerate(plan.jobs, 1):
            say(f"fio {spec.rw} bs={_size_label(spec.bs)} qd={spec.iodepth} ({i}/{len(plan.jobs)})")
            argv = fio_argv(fio, path, spec, ioengine=ioengine, direct=direct, file_size=file_size,
                            runtime_s=plan.runtime_s, ramp_s=plan.ramp_s)
            timeout = plan.runtime_s + plan.ramp_s + 120 + file_size / (20 * MiB)  # room to lay the file out
            result.points.extend(_run_job(argv, timeout))
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    result.load = meter.stop()
    result.duration_s = time.monotonic() - started
    if result.load.noisy:
        result.notes.append("the machine was busy or had CPU stolen during the run: figures are noisy")
    if not direct and mount.fstype not in ("tmpfs", "ramfs"):
        result.notes.append("buffered reads of a file smaller than RAM may be served from the page cache")
    return result


def _fit_file_size(directory: Path, wanted: int, notes: list[str]) -> int:
    free = shutil.disk_usage(directory).free
    # Leave the filesystem at least half its free space: the probe must not fill a user's disk.
    room = (free // 2) // MiB * MiB
    needed = min(wanted, 16 * MiB)
    if room < needed:
        raise ProbeError(f"storage directory {directory} has only {free // MiB} MiB free; "
                         f"the fio probe needs at least {2 * needed // MiB} MiB")
    size = min(wanted, room)
    if size < wanted:
        notes.append(f"test file shrunk to {size // MiB} MiB (wanted {wanted // MiB} MiB) to keep free space")
    return size


def _claim_test_file(directory: Path) -> Path:
    # O_EXCL so an existing file of the same name is never truncated or overwritten by fio.
    for _ in range(8):
        path = directory / f"tieremu-fio-{os.getpid()}-{secrets.token_hex(4)}.dat"
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        except FileExistsError:
            continue
        return path
    raise ProbeError(f"could not create a unique test file in {directory}")


def _run_job(argv: list[str], timeout: float) -> list[FioJob]:
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop(proc)
        raise ProbeError(f"fio did not finish within {timeout:.0f} s: {' '.join(argv)}") from None
    except BaseException:
        # Ctrl-C or any other interruption: fio must be gone before the caller removes its file.
        _stop(proc)
        raise
    if proc.returncode != 0:
        raise ProbeError(f"fio exited with status {proc.returncode} running {' '.join(argv[1:])}: "
                         f"{_tail(err) or _tail(out) or 'no message'}")
    jobs = parse_fio_json(out)
    failed = [j for j in jobs if j.error]
    if failed:
        code = failed[0].error
        raise ProbeError(f"fio job {failed[0].name} failed with error {code} ({os.strerror(code)}): {_tail(err)}")
    if not jobs:
        raise ProbeError(f"fio reported no jobs for {' '.join(argv[1:])}")
    return jobs


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)  # fio stops its jobs and closes the file on SIGINT
        try:
            proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


# ---------------------------------------------------------------------------------------------- output


def to_rows(result: StorageResult) -> list[dict[str, object]]:
    """One CSV row per job and direction; latencies in microseconds, `percentiles_of` says which latency."""
    rows: list[dict[str, object]] = []
    for p in result.points:
        rows.append({
            "directory": result.directory,
            "fstype": result.fstype or "",
            "rw": p.rw,
            "direction": p.direction,
            "bs": p.bs if p.bs is not None else "",
            "iodepth": p.iodepth,
            "direct": p.direct,
            "ioengine": p.ioengine or "",
            "MB/s": round(p.mb_per_s, 3),
            "IOPS": round(p.iops, 1),
            "lat_mean_us": round(p.lat_mean_ns / 1e3, 3),
            "lat_p50_us": _us(p.p50_ns),
            "lat_p99_us": _us(p.p99_ns),
            "lat_p999_us": _us(p.p999_ns),
            "percentiles_of": p.percentiles_of,
            "runtime_ms": p.runtime_ms,
            "origin": result.origin,
        })
    return rows


def _us(ns: float | None) -> float | str:
    return round(ns / 1e3, 3) if ns is not None else ""
