"""Fetching a Debian kernel package without touching the host's apt configuration.

The archive to use is derived from the machine's own Debian source (same URIs and keyring, another suite),
so no mirror is ever named in code; all apt state (sources, lists, caches) lives in a private directory.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tieremu.vm.errors import VmUnavailable

SOURCES_DIR = Path("/etc/apt/sources.list.d")
SOURCES_LIST = Path("/etc/apt/sources.list")
OS_RELEASE = Path("/etc/os-release")
KERNEL_META_PACKAGE = "linux-image-amd64"


@dataclass(frozen=True)
class AptSource:
    """One archive suite, written as a one-line apt source."""

    uri: str
    suite: str
    components: tuple[str, ...]
    signed_by: str | None = None

    def line(self) -> str:
        opts = f" [signed-by={self.signed_by}]" if self.signed_by else ""
        return f"deb{opts} {self.uri} {self.suite} {' '.join(self.components)}"


@dataclass(frozen=True)
class SourceEntry:
    """A `deb` entry of the host's configuration: several URIs and suites may share one entry."""

    uris: tuple[str, ...]
    suites: tuple[str, ...]
    components: tuple[str, ...]
    signed_by: str | None


def parse_deb822(text: str) -> list[SourceEntry]:
    """The `deb` entries of a deb822 `.sources` file; disabled entries and `deb-src` are left out."""
    entries = []
    for paragraph in _paragraphs(text):
        fields = {k.lower(): v for k, v in paragraph.items()}
        if "deb" not in fields.get("types", "").split():
            continue
        if fields.get("enabled", "yes").strip().lower() in ("no", "false", "0"):
            continue
        signed_by = fields.get("signed-by", "").strip()
        entries.append(SourceEntry(
            uris=tuple(fields.get("uris", "").split()),
            suites=tuple(fields.get("suites", "").split()),
            components=tuple(fields.get("components", "").split()),
            # An inline key block cannot go on a one-line source; the keyring then comes from apt's defaults.
            signed_by=signed_by if signed_by and "\n" not in signed_by else None,
        ))
    return entries


def parse_one_line(text: str) -> list[SourceEntry]:
    """The `deb` lines of a classic sources.list."""
    entries = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        m = re.match(r"^deb\s+(?:\[(?P<opts>[^\]]*)\]\s+)?(?P<uri>\S+)\s+(?P<suite>\S+)\s*(?P<comps>.*)$", line)
        if m is None:
            continue
        opts = dict(o.split("=", 1) for o in (m.group("opts") or "").split() if "=" in o)
        entries.append(SourceEntry((m.group("uri"),), (m.group("suite"),), tuple(m.group("comps").split()),
                                   opts.get("signed-by")))
    return entries


def _paragraphs(text: str) -> list[dict[str, str]]:
    paragraphs: list[dict[str, str]] = []
    current: dict[str, str] = {}
    key = None
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        if not line.strip():
            if current:
                paragraphs.append(current)
            current, key = {}, None
        elif line[0] in " \t" and key is not None:
            current[key] += "\n" + line.strip()
        elif ":" in line:
            key, value = line.split(":", 1)
            key = key.strip()
            current[key] = value.strip()
    if current:
        paragraphs.append(current)
    return paragraphs


def host_codename(os_release: Path = OS_RELEASE) -> str:
    try:
        text = os_release.read_text()
    except OSError as exc:
        raise VmUnavailable(f"cannot read {os_release} to find the Debian release ({exc.strerror})") from None
    m = re.search(r"^VERSION_CODENAME=\"?([a-z]+)\"?$", text, re.M)
    if m is None:
        raise VmUnavailable(f"{os_release} names no VERSION_CODENAME: the guest kernel comes from Debian's "
                            "archive and needs a Debian host")
    return m.group(1)


def host_source_entries(sources_dir: Path = SOURCES_DIR, sources_list: Path = SOURCES_LIST) -> list[SourceEntry]:
    entries: list[SourceEntry] = []
    if sources_list.is_file():
        entries += parse_one_line(sources_list.read_text())
    if sources_dir.is_dir():
        for path in sorted(sources_dir.glob("*.sources")):
            entries += parse_deb822(path.read_text())
        for path in sorted(sources_dir.glob("*.list")):
            entries += parse_one_line(path.read_text())
    return entries


def derive_source(entries: list[SourceEntry], codename: str, suite: str) -> AptSource:
    """The archive that carries `codename` itself (not -security, not -updates), pointed at `suite`."""
    for entry in entries:
        if codename in entry.suites and entry.uris:
            components = ("main",) if "main" in entry.components else entry.components[:1]
            return AptSource(entry.uris[0], suite, components, entry.signed_by)
    raise VmUnavailable(f"no apt source for Debian {codename} found under /etc/apt: the guest kernel "
                        f"package ({suite}) is fetched from the same archive")


@dataclass(frozen=True)
class PackageRef:
    name: str
    version: str


class PrivateApt:
    """apt-get and apt-cache with every piece of state under `root`; the host's apt setup is only read."""

    def __init__(self, root: Path, source: AptSource) -> None:
        self.root = root
        self.source = source
        self.sources_file = root / "sources.list"

    def _options(self) -> list[str]:
        return [
            "-o", f"Dir::Etc::SourceList={self.sources_file}",
            "-o", "Dir::Etc::SourceParts=/dev/null",
            "-o", f"Dir::State::Lists={self.root / 'lists'}",
            "-o", f"Dir::State::status={self.root / 'status'}",
            "-o", f"Dir::Cache={self.root / 'cache'}",
            "-o", "Dir::Cache::pkgcache=",
            "-o", "Dir::Cache::srcpkgcache=",
            "-o", "Debug::NoLocking=1",
            "-o", "APT::Get::List-Cleanup=0",
            # The private directories belong to whoever runs this, not to apt's sandbox user.
            *(["-o", "APT::Sandbox::User=root"] if os.geteuid() == 0 else []),
            "-q",
        ]

    def _run(self, tool: str, args: list[str], cwd: Path | None = None) -> str:
        try:
            proc = subprocess.run([tool, *self._options(), *args], cwd=cwd, capture_output=True, text=True,
                                  timeout=600, check=False)
        except FileNotFoundError:
            raise VmUnavailable(f"{tool} not found: the guest kernel is fetched with Debian's apt") from None
        except subprocess.TimeoutExpired:
            raise VmUnavailable(f"{tool} {' '.join(args)} did not finish in 600 s") from None
        problems = [ln for ln in (proc.stderr or "").splitlines() if ln.startswith(("E:", "Err:"))]
        if proc.returncode != 0 or problems:
            detail = "; ".join(problems) or (proc.stderr or "").strip() or f"exit code {proc.returncode}"
            raise VmUnavailable(f"{tool} {' '.join(args)} failed for '{self.source.line()}': {detail}")
        return proc.stdout

    def update(self) -> None:
        for sub in ("lists/partial", "cache/archives/partial"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        (self.root / "status").touch()
        self.sources_file.write_text(self.source.line() + "\n")
        self._run("apt-get", ["update"])

    def kernel_package(self) -> PackageRef:
        """The versioned image package that the suite's `linux-image-amd64` points at."""
        text = self._run("apt-cache", ["show", "--no-all-versions", KERNEL_META_PACKAGE])
        m = re.search(r"^Depends:.*?\b(linux-image-[^\s,(]+)\s*\(=\s*([^)\s]+)\)", text, re.M)
        if m is None:
            raise VmUnavailable(f"{KERNEL_META_PACKAGE} in {self.source.suite} names no kernel image package")
        return PackageRef(m.group(1), m.group(2))

    def download(self, package: PackageRef, into: Path) -> Path:
        into.mkdir(parents=True, exist_ok=True)
        self._run("apt-get", ["download", f"{package.name}={package.version}"], cwd=into)
        debs = sorted(into.glob(f"{package.name}_*.deb"))
        if not debs:
            raise VmUnavailable(f"apt-get download {package.name} left no .deb in {into}")
        return debs[-1]


def extract_deb(deb: Path, into: Path) -> None:
    into.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["dpkg-deb", "-x", str(deb), str(into)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise VmUnavailable(f"dpkg-deb -x {deb} failed: {proc.stderr.strip()}")

