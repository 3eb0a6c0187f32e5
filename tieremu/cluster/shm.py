"""The shared-memory transport: a pool of memory bound to one NUMA node and mapped by every instance, standing for a
CXL shared-memory pool that several hosts map.

Design (the simplest honest one): the pool is the medium a block crosses, not a second copy of every tier. It is
one file in /dev/shm (tmpfs: shared memory that every instance process opens by name), created by the replay,
bound with mbind(MPOL_BIND) to the chosen node before any page exists, faulted in, and checked by asking the kernel
where each page is (move_pages in query mode): every page on the node, or the run is refused. It holds one slot of
one block per ordered pair of instances (holder, puller), so a pull never waits for another pair's, and in its
first page one progress word per slot: the pull's sequence number and the bytes written so far.

A pull keeps the TCP transport's control exchange (tieremu.cluster.wire: request, reply head, CRC-32C trailer), so
the peer index, the holder's lock, a dead peer (refused), a partition and loss (no reply: timeout) behave exactly
as over TCP; only the payload moves through the pool. The holder waits out the link's latency, copies the block
from its tier into the pair's slot, extending the CRC-32C over each slice as it goes (paced at the link's rate
when a link is given), and replies with the head and the checksum. The puller copies each slice out of the pool as
soon as the progress word says it is there (so its copy and checksum overlap the paced transfer, as a NIC's DMA
overlaps the wire), the rest when the reply comes, and checks the CRC over the bytes it read: a block corrupted in
the pool is refused like a corrupted TCP block. (A progress word is one aligned 8-byte store and load, which x86
makes atomic and orders after the slice's own stores.)

The pool's file is removed by the replay when it ends, on error and on Ctrl-C; its name carries the replay's
process id, so a replay that was killed (SIGKILL) is cleaned up by the next one (`cleanup_stale_pools`).

On a machine whose pool node has CPUs (a DRAM node; on a one-node machine node 0), the CXL pool is emulated by
that node's memory and every result says so; a CPU-less memory node is the real kind of memory a CXL pool is.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import re
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tieremu.errors import ConfigError, NodeFullError, PlacementError
from tieremu.numa import pages, syscalls
from tieremu.numa.syscalls import Policy
from tieremu.numa.topology import Topology, discover
from tieremu.processes import alive

SHM_DIR = Path(os.environ.get("TIEREMU_SHM_DIR", "/dev/shm"))
PREFIX = "tieremu-pool-"
_NAME = re.compile(rf"^{PREFIX}(\d+)-[0-9a-f]+$")
MADV_POPULATE_READ, MADV_POPULATE_WRITE = 22, 23  # Linux 5.14

SEQ_SHIFT = 40  # a progress word: the pull's sequence number (24 bits) above the bytes written (40 bits)
SEQ_MASK = (1 << (64 - SEQ_SHIFT)) - 1
BYTES_MASK = (1 << SEQ_SHIFT) - 1

_libc = ctypes.CDLL(None, use_errno=True)


def pool_backing(node: int, topology: Topology | None = None) -> str:
    """'emulated' when the node has CPUs (DRAM standing in for a CXL pool), 'cpuless' for a CPU-less memory node."""
    topo = topology or discover()
    return "cpuless" if node in topo.cpuless_nodes else "emulated"


def check_node(node: int, topology: Topology | None = None) -> None:
    """ConfigError naming the node and the valid ones, before anything is created."""
    topo = topology or discover()
    if node not in topo.memory_nodes:
        valid = ", ".join(str(n) for n in topo.memory_nodes) or "none"
        raise ConfigError(f"--shm-node {node}: no such memory node on this machine; nodes with memory: {valid}")


def slot_bytes(block_bytes: int) -> int:
    """A slot: one block, rounded up to whole pages (slots never share a page)."""
    return -(-block_bytes // pages.PAGE_SIZE) * pages.PAGE_SIZE


@dataclass(frozen=True)
class PoolSpec:
    """What an instance needs to map the pool: its file, its geometry and the node it is bound to."""

    path: str
    instances: int
    slot_bytes: int
    node: int

    @property
    def header_bytes(self) -> int:
        """The progress words, one per slot, rounded up to whole pages."""
        return -(-self.instances * self.instances * 8 // pages.PAGE_SIZE) * pages.PAGE_SIZE

    @property
    def nbytes(self) -> int:
        return self.header_bytes + self.instances * self.instances * self.slot_bytes

    def slot(self, holder: int, puller: int) -> int:
        """The slot a block crosses from `holder` to `puller`."""
        return holder * self.instances + puller

    def to_json(self) -> dict[str, int | str]:
        return {"path": self.path, "instances": self.instances, "slot_bytes": self.slot_bytes, "node": self.node}


class ShmPool:
    """The pool mapped in this process (MAP_SHARED: every instance sees the same pages)."""

    def __init__(self, spec: PoolSpec, fd: int) -> None:
        self.spec = spec
        try:
            self._map = mmap.mmap(fd, spec.nbytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self.view = memoryview(self._map)
        # A holder's writes into a slot: the newest pull for a slot owns it (see claim).
        self._lock = threading.Lock()
        self._owner: dict[int, tuple[int, int]] = {}  # slot -> (claim token, the pull's sequence number)
        self._claims = 0
        self._progress: np.ndarray | None = np.frombuffer(self._map, dtype=np.uint64, count=spec.instances ** 2)
        first = ctypes.c_char.from_buffer(self._map)
        self.addr = ctypes.addressof(first)
        del first  # its buffer export would keep close() from unmapping

    @classmethod
    def create(cls, instances: int, block_bytes: int, node: int) -> ShmPool:
        """Create the pool's file, bind it to `node` before first touch, fault it in, check where the kernel put
        it. Anything created is removed again if a step fails."""
        spec = PoolSpec(str(SHM_DIR / f"{PREFIX}{os.getpid()}-{secrets.token_hex(4)}"), instances,
                        slot_bytes(block_bytes), node)
        fd = os.open(spec.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        pool: ShmPool | None = None
        try:
            os.ftruncate(fd, spec.nbytes)
            pool = cls(spec, fd)
            # On a shared tmpfs mapping mbind sets the file's own policy: pages faulted by any mapper follow it.
            syscalls.mbind(pool.addr, spec.nbytes, Policy.BIND, (node,))
            if _libc.madvise(ctypes.c_void_p(pool.addr), ctypes.c_size_t(spec.nbytes), MADV_POPULATE_WRITE):
                err = ctypes.get_errno()
                if err == 12:
                    raise NodeFullError(f"shared-memory pool of {spec.nbytes >> 20} MiB: node {node} is out of "
                                        "memory", call="madvise(populate_write)", errno=err, nodes=(node,))
                pool.view[:] = bytes(spec.nbytes)  # no MADV_POPULATE_WRITE: touch every page
            pool.require_on_node()
        except BaseException:
            if pool is not None:
                pool.close()
            else:
                os.close(fd)
            remove(spec.path)
            raise
        return pool

    @classmethod
    def attach(cls, spec: PoolSpec) -> ShmPool:
        """Map an existing pool (an instance); its pages stay where the replay's binding put them."""
        try:
            fd = os.open(spec.path, os.O_RDWR)
        except FileNotFoundError:
            raise PlacementError(f"shared-memory pool {spec.path} is gone (the replay removed it)") from None
        pool = cls(spec, fd)
        # Map the pages the replay faulted (no new page: the file's pages exist), so move_pages can say where.
        if _libc.madvise(ctypes.c_void_p(pool.addr), ctypes.c_size_t(spec.nbytes), MADV_POPULATE_READ):
            sum(pool.view[off] for off in range(0, spec.nbytes, pages.PAGE_SIZE))
        return pool

    def placement(self) -> pages.Placement:
        """Where the kernel says the pool's pages are (move_pages query: nothing is faulted in or moved)."""
        return pages.placement(self.addr, self.spec.nbytes)

    def require_on_node(self) -> pages.Placement:
        where = self.placement()
        if where.fraction_on((self.spec.node,)) < 1.0:
            raise PlacementError(f"shared-memory pool {self.spec.path}: bound to node {self.spec.node} but the "
                                 f"kernel reports {where.describe()}")
        return where

    def slot_view(self, holder: int, puller: int, nbytes: int) -> memoryview:
        if nbytes > self.spec.slot_bytes:
            raise PlacementError(f"a block of {nbytes} bytes does not fit the pool's {self.spec.slot_bytes}-byte "
                                 "slots")
        start = self.spec.header_bytes + self.spec.slot(holder, puller) * self.spec.slot_bytes
        return self.view[start:start + nbytes]

    def progress(self, holder: int, puller: int) -> tuple[int, int]:
        """(sequence number of the pull being written into the slot, bytes of it written so far)."""
        assert self._progress is not None
        word = int(self._progress[self.spec.slot(holder, puller)])
        return word >> SEQ_SHIFT, word & BYTES_MASK

    def claim(self, holder: int, puller: int, seq: int) -> int:
        """Make the slot the pull numbered `seq`'s: a pull for it still being served (one the puller gave up on: a
        timeout) writes nothing more, so it never mixes its bytes into the new block. A token for write()."""
        slot = self.spec.slot(holder, puller)
        with self._lock:
            self._claims += 1
            self._owner[slot] = (self._claims, seq)
            self._set_progress(slot, seq, 0)
            return self._claims

    def write(self, holder: int, puller: int, token: int, offset: int, data: memoryview) -> bool:
        """Copy `data` to the slot at `offset` if the claim `token` still owns it; False if it was superseded."""
        slot = self.spec.slot(holder, puller)
        with self._lock:
            owner = self._owner.get(slot)
            if owner is None or owner[0] != token:
                return False
            start = self.spec.header_bytes + slot * self.spec.slot_bytes + offset
            self.view[start:start + len(data)] = data
            self._set_progress(slot, owner[1], offset + len(data))  # after the bytes: a reader never runs ahead
        return True

    def _set_progress(self, slot: int, seq: int, done: int) -> None:
        assert self._progress is not None
        self._progress[slot] = (seq & SEQ_MASK) << SEQ_SHIFT | done

    def close(self) -> None:
        self._progress = None
        self.view.release()
        with contextlib.suppress(BufferError):
            self._map.close()


def remove(path: str | os.PathLike[str]) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def cleanup_stale_pools() -> list[str]:
    """Remove pool files whose replay process is gone (it was killed before its cleanup ran); the paths removed."""
    removed = []
    if not SHM_DIR.is_dir():
        return removed
    for path in SHM_DIR.glob(f"{PREFIX}*"):
        match = _NAME.match(path.name)
        if match is None or alive(int(match.group(1))):
            continue
        remove(path)
        removed.append(str(path))
    return removed


def pools_of(pid: int) -> list[Path]:
    """The pool files a replay process made (tests check none is left behind)."""
    return sorted(SHM_DIR.glob(f"{PREFIX}{pid}-*")) if SHM_DIR.is_dir() else []


