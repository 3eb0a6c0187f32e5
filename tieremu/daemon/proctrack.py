"""Coarse access tracking of another process: which 2 MiB chunks of its anonymous memory it touched each epoch.

What Linux offers for watching another process, as probed here (DESIGN.md):

- `page_idle` (per-page idle bits) is absent, and DAMON's kdamond is owned by the platform: neither is used.
- Writing 1 to `/proc/PID/clear_refs` clears the accessed bits of every page; `Referenced:` in `/proc/PID/smaps`
  then counts the bytes read *or* written since, but only per VMA. It works on this kernel (6.18) and in the
  guest (6.12). One KV cache is often one huge VMA, so on its own it cannot tell one chunk from another.
- `/proc/PID/pagemap` gives, per page, whether it is present (bit 63) and soft-dirty (bit 55: written since
  `clear_refs` 4). Presence works everywhere. Soft-dirty needs CONFIG_MEM_SOFT_DIRTY: this host's kernel lacks it
  (bit 55 stays 0 even on a freshly written page, which is how `soft_dirty_supported` detects it); Debian's
  kernels have it.

The choice: pagemap per chunk for what it can see exactly, smaps per VMA for the rest. Each epoch, per page:
*known* touched = written since the last epoch (soft-dirty, where the kernel has it) or, without soft-dirty,
newly present (faulted in since the last epoch). A chunk with a known-touched page was referenced. A VMA whose
Referenced pages exceed its known-touched pages was also read somewhere we cannot see more finely, so every chunk
of it with present pages counts as referenced. Writes and first touches are therefore exact per chunk, plain
reads are exact per VMA and smeared over it; a process whose hot and cold data sit in different VMAs is tracked
per VMA exactly. Costs: one smaps read, one pagemap read of the tracked regions and one or two clear_refs writes
per epoch (each walks the target's page tables); clearing accessed bits also makes the kernel's own reclaim see
the target's pages as colder, and clearing soft-dirty costs the target one minor fault per page it writes next.
Moving a page does not mark it accessed (the accessed bit is carried over), but on x86 it does mark it soft-dirty,
so the daemon clears soft-dirty again after an epoch's migrations (`forget_writes`).

Chunks are aligned slices of the address space: chunk id = address // chunk size, stable for as long as the
mapping lives. Nothing here writes anything but clear_refs, and `check_access` writes nothing at all.
"""

from __future__ import annotations

import errno as errno_mod
import mmap
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from tieremu.errors import TieremuError
from tieremu.numa.pages import PAGE_SIZE, page_addresses

DEFAULT_CHUNK_BYTES = 2 << 20
PAGEMAP_PRESENT = np.uint64(1 << 63)
PAGEMAP_SOFT_DIRTY = np.uint64(1 << 55)
CLEAR_REFERENCED = "1"
CLEAR_SOFT_DIRTY = "4"

_HEADER = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S{4}) ([0-9a-f]+) (\S+) (\d+)\s*(.*)$")
_FIELD = re.compile(r"^(\w+):\s+(\d+) kB$")


class AttachError(TieremuError):
    """A process cannot be attached to or tracked: no such process, no permission, nowhere to move its pages.
    (Defined here, not in tieremu/errors.py: only the attach daemon raises it.)"""


class TargetGoneError(AttachError):
    """The attached process exited (or became a zombie) while it was being tracked."""

    def __init__(self, message: str, *, pid: int) -> None:
        super().__init__(message)
        self.pid = pid


@dataclass(frozen=True)
class Vma:
    """One line of /proc/PID/maps (or one header of smaps)."""

    start: int
    end: int
    perms: str
    inode: int
    path: str

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def anonymous(self) -> bool:
        """Private or shared anonymous memory, the heap, or a named anonymous mapping: where a process keeps data."""
        if self.inode != 0:
            return False
        return self.path in ("", "[heap]") or self.path.startswith("[anon:")

    @property
    def read_write(self) -> bool:
        return self.perms[0] == "r" and self.perms[1] == "w"


@dataclass(frozen=True)
class Region:
    """A tracked VMA in one epoch, with what smaps said of it."""

    vma: Vma
    rss_bytes: int
    referenced_bytes: int


def parse_smaps(text: str) -> list[Region]:
    """Every VMA of /proc/PID/smaps (or /proc/PID/maps, whose regions then read 0 bytes) with Rss and Referenced."""
    regions: list[Region] = []
    vma: Vma | None = None
    fields: dict[str, int] = {}
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header is not None:
            if vma is not None:
                regions.append(_region(vma, fields))
            start, end, perms, _offset, _dev, inode, path = header.groups()
            vma, fields = Vma(int(start, 16), int(end, 16), perms, int(inode), path.strip()), {}
            continue
        m = _FIELD.match(line)
        if m is not None and vma is not None:
            fields[m.group(1)] = int(m.group(2)) * 1024
    if vma is not None:
        regions.append(_region(vma, fields))
    return regions


def _region(vma: Vma, fields: dict[str, int]) -> Region:
    return Region(vma, fields.get("Rss", 0), fields.get("Referenced", 0))


def select_regions(regions: Sequence[Region], min_bytes: int) -> list[Region]:
    """The regions worth tracking: anonymous or heap, readable and writable, at least min_bytes long."""
    return [r for r in regions if r.vma.anonymous and r.vma.read_write and r.vma.size >= min_bytes]


@dataclass(frozen=True, eq=False)
class RegionPages:
    """Per-page pagemap bits of one region: present, and written since the last clear (None: no soft-dirty)."""

    region: Region
    addrs: np.ndarray
    present: np.ndarray
    dirty: np.ndarray | None


@dataclass(frozen=True, eq=False)
class ChunkActivity:
    """What one chunk did during an epoch."""

    chunk: int
    pages: np.ndarray  # addresses of its present pages (what a migration moves)
    new_pages: int  # present now, not at the end of the last epoch
    written_pages: int | None  # soft-dirty since the last epoch; None where the kernel has no soft-dirty
    referenced: bool  # see the module docstring for the rule

    @property
    def present_pages(self) -> int:
        return int(self.pages.size)


@dataclass(frozen=True, eq=False)
class Sample:
    """One epoch's view of the process."""

    time_s: float  # monotonic
    regions: tuple[Region, ...]
    chunks: dict[int, ChunkActivity]
    smeared_regions: int  # regions referenced beyond their known-touched pages: all their chunks count
    present: np.ndarray = field(repr=False)  # sorted addresses of every present page (next epoch's baseline)


def chunk_activity(region_pages: Sequence[RegionPages], previous_present: np.ndarray, chunk_bytes: int,
                   page_size: int = PAGE_SIZE) -> tuple[dict[int, ChunkActivity], int, np.ndarray]:
    """Apply the rule of the module docstring. Returns the chunks in address order, how many regions were smeared
    (read beyond what pagemap saw), and the sorted addresses of every present page (next epoch's baseline)."""
    soft_dirty = bool(region_pages) and all(rp.dirty is not None for rp in region_pages)
    pages: dict[int, list[np.ndarray]] = {}
    new: dict[int, int] = {}
    known: dict[int, int] = {}
    smeared: set[int] = set()
    smeared_regions = 0
    for rp in region_pages:
        present = rp.addrs[rp.present]
        is_new = np.isin(present, previous_present, invert=True)
        touched = rp.dirty[rp.present] if rp.dirty is not None else is_new
        smear = rp.region.referenced_bytes // page_size > int(np.count_nonzero(touched))
        smeared_regions += smear
        ids, first = np.unique(present // np.uint64(chunk_bytes), return_index=True)
        bounds = [*first.tolist(), present.size]
        for i, chunk in enumerate(ids.tolist()):
            lo, hi = bounds[i], bounds[i + 1]
            pages.setdefault(chunk, []).append(present[lo:hi])
            new[chunk] = new.get(chunk, 0) + int(np.count_nonzero(is_new[lo:hi]))
            known[chunk] = known.get(chunk, 0) + int(np.count_nonzero(touched[lo:hi]))
            if smear:
                smeared.add(chunk)
    chunks = {
        chunk: ChunkActivity(chunk, np.concatenate(pages[chunk]), new[chunk], known[chunk] if soft_dirty else None,
                             known[chunk] > 0 or chunk in smeared)
        for chunk in sorted(pages)
    }
    every = [c.pages for c in chunks.values()]
    present_all = np.sort(np.concatenate(every)) if every else np.empty(0, dtype=np.uint64)
    return chunks, smeared_regions, present_all


def soft_dirty_supported(proc: str = "/proc") -> bool:
    """Whether this kernel keeps soft-dirty bits: a page this process just wrote must show bit 55 in pagemap."""
    area = mmap.mmap(-1, PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        area[0] = 1
        view = np.frombuffer(area, dtype=np.uint8)
        addr = view.ctypes.data
        try:
            with open(f"{proc}/self/pagemap", "rb") as f:
                entry = np.frombuffer(os.pread(f.fileno(), 8, addr // PAGE_SIZE * 8), dtype=np.uint64)
        finally:
            del view
        return bool(entry.size and entry[0] & PAGEMAP_SOFT_DIRTY)
    except OSError:
        return False
    finally:
        area.close()


class ProcessTracker:
    """Samples one process each epoch: its regions, their present pages, and which chunks it referenced."""

    def __init__(self, pid: int, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES, min_region_bytes: int | None = None,
                 soft_dirty: bool | None = None, proc: str = "/proc") -> None:
        if chunk_bytes < PAGE_SIZE or chunk_bytes % PAGE_SIZE:
            raise AttachError(f"chunk size {chunk_bytes} bytes: give a multiple of the page size ({PAGE_SIZE})")
        self.pid = pid
        self.chunk_bytes = chunk_bytes
        self.min_region_bytes = chunk_bytes if min_region_bytes is None else min_region_bytes
        self.soft_dirty = soft_dirty_supported(proc) if soft_dirty is None else soft_dirty
        self._dir = f"{proc}/{pid}"
        self._previous = np.empty(0, dtype=np.uint64)
        self._started = False

    @property
    def method(self) -> str:
        per_chunk = "soft-dirty" if self.soft_dirty else "newly present pages"
        return f"per chunk: {per_chunk} (pagemap); per VMA: Referenced (clear_refs + smaps)"

    def check_access(self) -> None:
        """Raise AttachError naming the pid and what is missing; reads and opens only, changes nothing."""
        self._require_alive()
        for name, flags in (("smaps", os.O_RDONLY), ("pagemap", os.O_RDONLY), ("clear_refs", os.O_WRONLY)):
            path = f"{self._dir}/{name}"
            try:
                os.close(os.open(path, flags))
            except FileNotFoundError:
                raise self._gone("does not exist") from None
            except ProcessLookupError:  # exiting: its memory is already gone
                raise self._gone("has exited") from None
            except PermissionError:
                raise AttachError(
                    f"process {self.pid}: cannot {'write' if flags == os.O_WRONLY else 'read'} {path}: tracking "
                    "another process needs the same user as the process, or root (CAP_SYS_PTRACE)") from None

    def start(self) -> None:
        """Begin the first epoch: note which pages are present now and clear the access bits."""
        regions = self._regions()
        self._previous = chunk_activity(self._pagemap(regions), np.empty(0, dtype=np.uint64), self.chunk_bytes)[2]
        self._clear()
        self._started = True

    def sample(self) -> Sample:
        """End an epoch: what was touched since the last call (or `start`), then clear for the next."""
        regions = self._regions()
        region_pages = self._pagemap(regions)
        self._clear()
        now = time.monotonic()
        chunks, smeared, present = chunk_activity(region_pages, self._previous, self.chunk_bytes)
        self._previous = present
        return Sample(now, tuple(regions), chunks, smeared, present)

    def forget_writes(self) -> None:
        """Clear the soft-dirty bits again after the daemon moved pages. Migration re-creates each page table entry
        with the page's dirty bit, and on x86 setting that also sets soft-dirty: without this, every page moved
        would read as written in the next epoch. Writes between the sample and this call are lost for the epoch."""
        if self.soft_dirty:
            self._clear((CLEAR_SOFT_DIRTY,))

    # -- /proc ---------------------------------------------------------------------------------------------

    def _regions(self) -> list[Region]:
        text = self._read_text("smaps")
        if not text:
            self._require_alive()  # a zombie has an empty smaps
        return select_regions(parse_smaps(text), self.min_region_bytes)

    def _pagemap(self, regions: Sequence[Region]) -> list[RegionPages]:
        out = []
        try:
            fd = os.open(f"{self._dir}/pagemap", os.O_RDONLY)
        except (FileNotFoundError, ProcessLookupError):
            raise self._gone("exited") from None
        try:
            for region in regions:
                addrs = page_addresses(region.vma.start, region.vma.size)
                data = os.pread(fd, addrs.size * 8, region.vma.start // PAGE_SIZE * 8)
                entries = np.frombuffer(data, dtype=np.uint64)
                if entries.size < addrs.size:
                    # The mapping shrank or went away since smaps was read: pages past the end are not present.
                    entries = np.concatenate([entries, np.zeros(addrs.size - entries.size, dtype=np.uint64)])
                present = (entries & PAGEMAP_PRESENT) != 0
                dirty = (entries & PAGEMAP_SOFT_DIRTY) != 0 if self.soft_dirty else None
                out.append(RegionPages(region, addrs, present, dirty))
        except ProcessLookupError:
            raise self._gone("exited") from None
        finally:
            os.close(fd)
        return out

    def _clear(self, kinds: Sequence[str] | None = None) -> None:
        if kinds is None:
            kinds = (CLEAR_REFERENCED, CLEAR_SOFT_DIRTY) if self.soft_dirty else (CLEAR_REFERENCED,)
        for kind in kinds:
            try:
                fd = os.open(f"{self._dir}/clear_refs", os.O_WRONLY)
                try:
                    os.write(fd, kind.encode())
                finally:
                    os.close(fd)
            except (FileNotFoundError, ProcessLookupError):
                raise self._gone("exited") from None
            except OSError as exc:
                if exc.errno == errno_mod.ESRCH:
                    raise self._gone("exited") from None
                raise AttachError(f"process {self.pid}: cannot clear its access bits through {self._dir}/clear_refs "
                                  f"({exc.strerror})") from None

    def _read_text(self, name: str) -> str:
        try:
            with open(f"{self._dir}/{name}") as f:
                return f.read()
        except (FileNotFoundError, ProcessLookupError):
            raise self._gone("exited") from None
        except PermissionError:
            raise AttachError(f"process {self.pid}: cannot read {self._dir}/{name}: tracking another process needs "
                              "the same user as the process, or root (CAP_SYS_PTRACE)") from None

    def _require_alive(self) -> None:
        state = process_state(self.pid, os.path.dirname(self._dir))
        if state is None:
            raise self._gone("does not exist")
        if state in ("Z", "X"):
            raise self._gone("has exited (it is a zombie waiting for its parent)")

    def _gone(self, what: str) -> TargetGoneError:
        if self._started:
            return TargetGoneError(f"process {self.pid} exited while it was tracked", pid=self.pid)
        return TargetGoneError(f"process {self.pid} {what}; give the pid of a running process to track (e.g. from "
                               "`pgrep -f vllm`)", pid=self.pid)

def process_state(pid: int, proc: str = "/proc") -> str | None:
    """The one-letter state of /proc/PID/status (R, S, D, Z, ...), or None when there is no such process."""
    try:
        with open(f"{proc}/{pid}/status") as f:
            for line in f:
                if line.startswith("State:"):
                    return line.split()[1]
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None

