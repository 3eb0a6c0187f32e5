"""What the guest boots, found or fetched once and cached: QEMU, a Debian kernel with its modules, an initramfs.

Cache layout under `cache_dir()`:
    apt/<suite>/          private apt state (sources, lists) for that suite
    kernels/<release>/    the extracted kernel package (boot/vmlinuz-*, lib/modules/<release>/)
    kernel.json           which cached kernel the guest boots, and where it came from
    initramfs-<release>-<hash>.cpio
    runs/                 one folder per `tieremu vm run`
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from tieremu.vm import apt
from tieremu.vm.errors import VmUnavailable
from tieremu.vm.initramfs import build_initramfs, init_script, load_order

REPO_ROOT = Path(__file__).resolve().parents[2]
CACHE_ENV = "TIEREMU_CACHE_DIR"
QEMU_ENV = "TIEREMU_VM_QEMU"
QEMU_NAME = "qemu-system-x86_64"
BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")
# Linux builds memory tiers from HMAT performance (and so demotion targets) from this release on.
HMAT_TIERS_SINCE = (6, 12)
KERNEL_CHOICES = ("auto", "backports", "distribution")
# hmat=on and hmat-lb exist from QEMU 5.0 on.
MIN_QEMU = (5, 0)


def cache_dir() -> Path:
    base = os.environ.get(CACHE_ENV)
    return (Path(base) / "vm") if base else (REPO_ROOT / ".cache" / "vm")


@dataclass(frozen=True)
class KernelInfo:
    release: str  # the `uname -r` of the guest, e.g. 6.12.95+deb12-amd64
    package: str
    package_version: str
    suite: str
    fallback: bool  # True when the backports kernel was wanted but could not be had
    root: Path  # the extracted package

    @property
    def vmlinuz(self) -> Path:
        return self.root / "boot" / f"vmlinuz-{self.release}"

    @property
    def modules_dir(self) -> Path:
        return self.root / "lib" / "modules" / self.release

    @property
    def version(self) -> tuple[int, int]:
        m = re.match(r"(\d+)\.(\d+)", self.release)
        return (int(m.group(1)), int(m.group(2))) if m else (0, 0)

    @property
    def hmat_memory_tiers(self) -> bool:
        """Whether this kernel ranks nodes into memory tiers from HMAT (6.1 keeps them all in one tier)."""
        return self.version >= HMAT_TIERS_SINCE

    def to_json(self) -> str:
        data = asdict(self)
        data["root"] = str(self.root)
        return json.dumps(data, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> KernelInfo:
        data = json.loads(text)
        data["root"] = Path(data["root"])
        return cls(**data)

    def ok(self) -> bool:
        return self.vmlinuz.is_file() and self.modules_dir.is_dir()


@dataclass(frozen=True)
class GuestAssets:
    qemu: Path
    qemu_version: str
    busybox: Path
    kernel: KernelInfo
    initramfs: Path


@dataclass
class PrepareReport:
    assets: GuestAssets
    actions: list[str] = field(default_factory=list)  # what this call did; empty when all was cached
    notes: list[str] = field(default_factory=list)  # what the user must know (a fallback kernel)


def find_qemu() -> tuple[Path, str]:
    override = os.environ.get(QEMU_ENV)
    found = override or shutil.which(QEMU_NAME)
    if not found or not Path(found).is_file():
        where = f"${QEMU_ENV}={override}" if override else f"{QEMU_NAME} on PATH"
        raise VmUnavailable(f"QEMU not found ({where}); install qemu-system-x86 (bash scripts/bootstrap.sh does)")
    try:
        proc = subprocess.run([found, "--version"], capture_output=True, text=True, timeout=60, check=False)
    except OSError as exc:
        raise VmUnavailable(f"{found} cannot be run: {exc.strerror}") from None
    m = re.search(r"version (\d+)\.(\d+)(\.\d+)?", proc.stdout)
    if proc.returncode != 0 or m is None:
        raise VmUnavailable(f"{found} --version failed: {(proc.stderr or proc.stdout).strip()}")
    if (int(m.group(1)), int(m.group(2))) < MIN_QEMU:
        raise VmUnavailable(f"{found} is QEMU {m.group(0)[8:]}; HMAT needs at least "
                            f"{MIN_QEMU[0]}.{MIN_QEMU[1]}")
    return Path(found), m.group(0)[len("version "):]


def find_busybox() -> Path:
    for candidate in BUSYBOX_CANDIDATES:
        path = Path(candidate)
        if path.is_file():
            if not is_static_elf(path):
                raise VmUnavailable(f"{path} is dynamically linked and cannot run alone in the initramfs; "
                                    "install busybox-static (bash scripts/bootstrap.sh does)")
            return path
    raise VmUnavailable("busybox not found; install busybox-static (bash scripts/bootstrap.sh does)")


def is_static_elf(path: Path) -> bool:
    """True for an ELF64 executable without a program interpreter (PT_INTERP)."""
    with path.open("rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2:
            return False
        phoff, = struct.unpack_from("<Q", head, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    return all(struct.unpack_from("<I", table, i * phentsize)[0] != 3 for i in range(phnum))


@contextmanager
def _locked(cache: Path) -> Iterator[None]:
    """One prepare at a time per cache: two test runs must not extract the same kernel at once."""
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def current_kernel(cache: Path) -> KernelInfo | None:
    path = cache / "kernel.json"
    if not path.is_file():
        return None
    try:
        info = KernelInfo.from_json(path.read_text())
    except (ValueError, TypeError, KeyError):
        return None
    return info if info.ok() else None


def _cached_kernel_from(cache: Path, suite: str) -> KernelInfo | None:
    """A kernel of `suite` that an earlier prepare extracted, whichever one kernel.json names now."""
    for meta in sorted((cache / "kernels").glob("*/tieremu-kernel.json")):
        try:
            info = KernelInfo.from_json(meta.read_text())
        except (ValueError, TypeError, KeyError):
            continue
        if info.suite == suite and info.ok():
            return info
    return None


def _fetch_kernel(cache: Path, suite: str, actions: list[str]) -> KernelInfo:
    source = apt.derive_source(apt.host_source_entries(), apt.host_codename(), suite)
    private = apt.PrivateApt(cache / "apt" / suite, source)
    private.update()
    package = private.kernel_package()
    release = package.name.removeprefix("linux-image-")
    root = cache / "kernels" / release
    info = KernelInfo(release, package.name, package.version, suite, False, root)
    if info.ok():
        return info
    downloads = cache / "downloads"
    deb = private.download(package, downloads)
    actions.append(f"downloaded {deb.name} ({deb.stat().st_size / 2**20:.0f} MiB) from {suite}")
    staging = root.with_name(root.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    apt.extract_deb(deb, staging)
    shutil.rmtree(root, ignore_errors=True)
    staging.rename(root)
    deb.unlink()
    actions.append(f"extracted kernel {release} to {root}")
    if not info.ok():
        raise VmUnavailable(f"{package.name} has no {info.vmlinuz.name} or modules for {release}")
    return info


def _select_kernel(cache: Path, choice: str, refresh: bool, keep_current: bool, actions: list[str],
                   notes: list[str]) -> KernelInfo:
    codename = apt.host_codename()
    backports, distribution = f"{codename}-backports", codename
    current = current_kernel(cache)
    want_backports = choice in ("auto", "backports")
    if current is not None and not refresh:
        if keep_current:
            return current
        if want_backports and current.suite == backports:
            return current
        if choice == "distribution" and current.suite == distribution:
            return replace(current, fallback=False)
    if want_backports:
        try:
            cached = None if refresh else _cached_kernel_from(cache, backports)
            return cached or _fetch_kernel(cache, backports, actions)
        except VmUnavailable as exc:
            if choice == "backports":
                raise
            notes.append(f"the {backports} kernel could not be fetched ({exc}); falling back to the "
                         f"{distribution} kernel: memory-tier and demotion checks will be skipped, because "
                         f"only Linux {HMAT_TIERS_SINCE[0]}.{HMAT_TIERS_SINCE[1]}+ builds memory tiers from HMAT")
    cached = None if refresh else _cached_kernel_from(cache, distribution)
    kernel = cached or _fetch_kernel(cache, distribution, actions)
    return replace(kernel, fallback=want_backports)


def prepare(choice: str = "auto", refresh: bool = False, keep_current: bool = False) -> PrepareReport:
    """Find QEMU and busybox, fetch and extract the kernel and build the initramfs, unless already cached.

    choice: "auto" (the backports kernel, else the distribution's), "backports" or "distribution".
    refresh: ask the archive again for the newest kernel of the suite even when one is cached.
    keep_current: boot whichever kernel an earlier prepare selected, if any (`vm run` does: it must not go
    to the network on every run, nor undo a `vm prepare --kernel distribution`).
    """
    if choice not in KERNEL_CHOICES:
        raise ValueError(f"kernel choice {choice!r}; valid: {', '.join(KERNEL_CHOICES)}")
    qemu, qemu_version = find_qemu()
    busybox = find_busybox()
    cache = cache_dir()
    actions: list[str] = []
    notes: list[str] = []
    with _locked(cache):
        before = current_kernel(cache)
        kernel = _select_kernel(cache, choice, refresh, keep_current, actions, notes)
        # Per kernel: what it is; kernel.json: which one is selected, and whether as a fallback.
        (kernel.root / "tieremu-kernel.json").write_text(replace(kernel, fallback=False).to_json())
        if before != kernel:
            (cache / "kernel.json").write_text(kernel.to_json())
            if not actions:
                actions.append(f"selected the cached kernel {kernel.release} ({kernel.suite})")
        initramfs = _initramfs(cache, kernel, busybox, actions)
    if not kernel.hmat_memory_tiers and not notes:
        why = "the backports kernel could not be had" if kernel.fallback else "as selected"
        notes.append(f"the guest boots {kernel.release} from {kernel.suite} ({why}): it builds no memory tiers "
                     "from HMAT, so memory-tier and demotion checks will be skipped; `tieremu vm prepare` "
                     "selects the backports kernel again")
    return PrepareReport(GuestAssets(qemu, qemu_version, busybox, kernel, initramfs), actions, notes)


def _initramfs(cache: Path, kernel: KernelInfo, busybox: Path, actions: list[str]) -> Path:
    digest = hashlib.sha256()
    digest.update(init_script().encode())
    digest.update(busybox.read_bytes())
    digest.update(" ".join(name for name, _ in load_order(kernel.modules_dir)).encode())
    path = cache / f"initramfs-{kernel.release}-{digest.hexdigest()[:12]}.cpio"
    if not path.is_file():
        for stale in cache.glob(f"initramfs-{kernel.release}-*.cpio"):
            stale.unlink()
        modules = build_initramfs(busybox, kernel.modules_dir, path)
        actions.append(f"built {path.name} ({path.stat().st_size / 2**20:.1f} MiB; busybox {busybox}, "
                       f"modules {', '.join(modules)})")
    return path
