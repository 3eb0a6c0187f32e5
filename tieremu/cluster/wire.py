"""The block transport: TCP between instances, every block checksummed end to end, the link shaped per message.

A pull is one request (op, hash id) and one reply: a head (status, hash id, length), the payload, and a trailer
holding the CRC-32C of the payload (the checksum iSCSI and SCTP carry for the same job: catching corrupted bytes,
not attackers; the SSE4.2 instruction in tieremu/native/checksum.c, ~8 GB/s here against zlib's CRC-32 at ~3.4).
The server reads the block from its tier's memory under the cache's lock (one copy: the slot may be reused once
the lock is let go), waits out the link's latency (plus uniform jitter), and drops the reply with the link's loss
probability. It then streams the payload in slices, extending the checksum over each slice just before that
slice goes out, so hashing overlaps the wire instead of adding to it; where the kernel does not shape the rate
(loopback) it also paces the slices at the link's bandwidth, each slice ~50 us of the rate and at least 64 KiB
(one GSO packet, the unit the kernel hands tbf). The client receives into a buffer it keeps (no allocation, no
page faults per pull), woken per 256 KiB rather than per packet (SO_RCVLOWAT), extends its own checksum over each
piece as it arrives, and compares with the trailer before anything is stored: a block that fails is counted as
corrupted and recomputed.

The delays are paid by a precise wait (sleep with the thread's timer slack cut to 1 us, then spin the last
80 us), the way a NIC's latency is paid by waiting for it: that is the emulated link's behaviour, not work stood
in for; a paced slice other than the last only sleeps. Nagle is off on both ends (TCP_NODELAY): a pull is a
request-reply exchange.

With a shared-memory pool (tieremu.cluster.shm, `--transport shm`) the exchange is the same but the payload goes
through the pool: the server copies each checksummed slice into the (holder, puller) slot, the reply carries only
the head and the trailer, and the client copies the slot out and checks it.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import random
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from tieremu.cluster.link import LinkSpec
from tieremu.cluster.shm import SEQ_MASK, ShmPool
from tieremu.native.build import checksum_kernels

OP_GET = 1
OP_GET_SHM = 2  # the payload goes through the shared-memory pool, not the socket (tieremu.cluster.shm)
OK, NOT_HELD = 0, 1
# op, hash id; for a shared-memory pull the puller's instance number (its slot) and the pull's sequence number
_REQ = struct.Struct("!BQHI")
_HEAD = struct.Struct("!BQQ")  # status, hash id, payload length
_TRAILER = struct.Struct("!I")  # CRC-32C of the payload
SLICE = 256 * 1024  # unpaced: checksum one slice while the kernel drains the one before
MIN_PACED_SLICE = 64 * 1024  # one GSO packet, the unit the kernel hands tbf (netns.burst_bytes)
PACE_QUANTUM_S = 50e-6  # a paced slice holds this long of the link's rate (64 KiB at least)
SPIN_S = 80e-6
POLL_S = 100e-6  # a shared-memory pull looks at the holder's progress this often while it waits for the reply
RECV_LOWAT = 256 * 1024  # wake the receiver per 256 KiB of a block, not per packet: fewer wake-ups to wait for
PR_SET_TIMERSLACK = 29

try:
    _libc: ctypes.CDLL | None = ctypes.CDLL(None, use_errno=True)
except OSError:  # not Linux: sleeps keep the default slack
    _libc = None


def digest(data: bytes | memoryview) -> bytes:
    """A block's 16-byte BLAKE2b, the digest the instances keep to check resident blocks at the end of a run."""
    return hashlib.blake2b(data, digest_size=16).digest()


def checksum(data: bytes | bytearray | memoryview, value: int = 0) -> int:
    """The wire's end-to-end checksum (CRC-32C), extended from `value` over `data`."""
    view = np.frombuffer(data, dtype=np.uint8)  # no copy; read-only buffers too
    return int(_crc32c()(value, view.ctypes.data, view.size))


def _crc32c() -> Any:
    return checksum_kernels().crc32c_update


def precise_sleeps() -> None:
    """Cut this thread's timer slack to 1 us (default 50 us), so a sleep wakes within ~20 us of its due time and
    wait_until spins less."""
    if _libc is not None:
        _libc.prctl(PR_SET_TIMERSLACK, 1000, 0, 0, 0)


def wait_until(due: float, spin: bool = True) -> None:
    """Wait until time.perf_counter() reaches `due`: sleep the bulk, spin the last 80 us. Without `spin`, only
    sleep (a wake-up may be ~20 us late): for a paced slice that is not the last, whose lateness the next slice
    makes up, so the CPU is left to the receiver instead of being burnt."""
    while True:
        left = due - time.perf_counter()
        if left <= 0:
            return
        if not spin:
            time.sleep(left)
            return
        if left > SPIN_S:
            time.sleep(left - SPIN_S)


def paced_slice(gbps: float) -> int:
    """Bytes per paced slice: PACE_QUANTUM_S of the rate, at least 64 KiB, a multiple of 4 KiB."""
    nbytes = int(gbps * 1e9 / 8 * PACE_QUANTUM_S)
    return max(MIN_PACED_SLICE, nbytes - nbytes % 4096)


@dataclass
class LinkState:
    """One outgoing link's current settings (a partition sets loss to 1 while it lasts)."""

    spec: LinkSpec
    pace: bool  # the transport paces the bytes (the kernel does not shape this link's rate)
    partitioned: bool = False


Payload = bytes | bytearray | memoryview
BlockReader = Callable[[int], "Payload | None"]  # hash id -> the block's bytes, None if not held
SlotWrite = Callable[[int, memoryview], bool]  # (offset, slice) -> copied into the pool slot (False: superseded)


def _tune(sock: socket.socket) -> None:
    """Nagle off. The buffer sizes are left to the kernel's autotuning (tcp_rmem reaches 32 MiB here): setting
    SO_SNDBUF/SO_RCVBUF pins them at net.core.*mem_max (4 MiB) and was no faster in the link benchmark."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _put(conn: socket.socket, *pieces: Payload) -> None:
    """Hand bytes to the kernel (the wire), gathering several buffers in one call without joining them."""
    if len(pieces) == 1:
        conn.sendall(pieces[0])
        return
    views = [memoryview(p).cast("B") for p in pieces]
    total = sum(len(v) for v in views)
    sent = conn.sendmsg(views)
    if sent < total:  # rare: the socket buffer was full; send the rest in order
        skip = sent
        for v in views:
            if skip >= len(v):
                skip -= len(v)
                continue
            conn.sendall(v[skip:])
            skip = 0


class BlockServer:
    """Serves pulls of this instance's blocks on (host, port), one thread per connection."""

    def __init__(self, host: str, port: int, read: BlockReader, links: Callable[[str], LinkState],
                 seed: int = 0, pool: ShmPool | None = None, me: int = 0) -> None:
        self.read = read
        self.pool, self.me = pool, me  # with a pool: OP_GET_SHM pulls are answered through it
        self.links = links  # the peer's address -> the link the reply goes out on
        self.sock = socket.create_server((host, port), reuse_port=False)
        self.served_bytes = 0
        self.served = 0
        self.inflight = 0  # pulls being served now
        self.serve_s = 0.0  # moving average of one pull's time here (read, checksum, wait, send)
        self.dropped = 0
        self._lock = threading.Lock()
        self._random = random.Random(seed)
        self._closed = False
        self._thread = threading.Thread(target=self._accept, name="block-server", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, addr = self.sock.accept()
            except OSError:
                return
            _tune(conn)
            threading.Thread(target=self._serve, args=(conn, addr[0]), daemon=True).start()

    def _serve(self, conn: socket.socket, peer: str) -> None:
        precise_sleeps()
        head = bytearray(_REQ.size)
        with conn:
            while True:
                try:
                    if _recv_into(conn, memoryview(head)) is None:
                        return
                except OSError:
                    return
                start = time.perf_counter()
                with self._lock:
                    self.inflight += 1
                try:
                    if not self._reply(conn, peer, bytes(head), start):
                        return
                finally:
                    with self._lock:
                        self.inflight -= 1
                        self.serve_s += 0.2 * (time.perf_counter() - start - self.serve_s)

    def queue_s(self) -> float:
        """What a new pull would wait behind here: pulls in flight times the usual pull's time."""
        with self._lock:
            return self.inflight * self.serve_s

    def _reply(self, conn: socket.socket, peer: str, head: bytes, start: float) -> bool:
        """Answer one pull; False when the connection is gone."""
        op, key, puller, seq = _REQ.unpack(head)
        if op == OP_GET_SHM and self.pool is None:
            return False  # a client that expects a pool this server does not have: hang up
        payload = self.read(key)
        link = self.links(peer)
        with self._lock:
            jitter = self._random.uniform(0, link.spec.jitter_us) if link.spec.jitter_us else 0.0
            lost = link.partitioned or (link.spec.loss > 0 and self._random.random() < link.spec.loss)
        if lost:
            with self._lock:
                self.dropped += 1
            return True  # the reply never arrives: the client times out and recomputes
        due = start + (link.spec.latency_us + jitter) * 1e-6
        try:
            if payload is None:
                wait_until(due)
                _put(conn, _HEAD.pack(NOT_HELD, key, 0))
                return True
            view = memoryview(payload).cast("B")
            into: SlotWrite | None = None
            if op == OP_GET_SHM and self.pool is not None:
                pool = self.pool
                pool.slot_view(self.me, puller, len(view))  # the block fits a slot (else PlacementError)
                token = pool.claim(self.me, puller, seq)

                def into(offset: int, piece: memoryview) -> bool:
                    return pool.write(self.me, puller, token, offset, piece)
            wait_until(due)
            if not self._send(conn, _HEAD.pack(OK, key, len(view)), view, link, due, into):
                return False  # a newer pull took the slot: the puller gave up on this one and hung up
        except OSError:
            return False
        with self._lock:
            self.served += 1
            self.served_bytes += len(view)
        return True

    @staticmethod
    def _send(conn: socket.socket, head: bytes, view: memoryview, link: LinkState, start: float,
              into: SlotWrite | None = None) -> bool:
        """Head, payload slices (each checksummed just before it goes), trailer; paced from `start` if asked. With
        `into` (a pool slot's writer) the slices are copied there and only the head and trailer go on the socket;
        False if the slot was taken by a newer pull meanwhile."""
        step = paced_slice(link.spec.gbps) if link.pace else SLICE
        per_byte = 8 / (link.spec.gbps * 1e9)
        value = 0
        first = into is None
        for offset in range(0, len(view), step):
            piece = view[offset:offset + step]
            value = checksum(piece, value)
            if into is not None:
                if not into(offset, piece):
                    return False
            elif first:
                _put(conn, head, piece)
                first = False
            else:
                _put(conn, piece)
            if link.pace:  # the slice has left when the link says so; only the last one's end must be exact
                wait_until(start + (offset + len(piece)) * per_byte, spin=offset + step >= len(view))
        if first or into is not None:  # an empty block, or one in the pool: the head goes with the trailer
            _put(conn, head, _TRAILER.pack(value))
        else:
            _put(conn, _TRAILER.pack(value))
        return True

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


class PullError(Exception):
    """A pull that failed: `kind` is refused (peer gone), timeout (reply lost), unreachable (no route: a link down),
    or corrupt (checksum)."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


@dataclass(frozen=True)
class Pulled:
    key: int
    # None: the peer does not hold the block (a stale index entry). A view of the client's receive buffer: valid
    # until the next pull on the same client (copy it to keep it).
    payload: memoryview | None
    seconds: float


class BlockClient:
    """Pulls blocks from one peer over a persistent connection (reopened after any failure)."""

    def __init__(self, host: str, port: int, pool: ShmPool | None = None, me: int = 0, holder: int = 0) -> None:
        """With `pool`, pulls ask `holder` to put the block in the pool's (holder, me) slot and copy it out."""
        self.host, self.port = host, port
        self.pool, self.me, self.holder = pool, me, holder
        # Pull numbers start at random, so a restarted instance never takes its old incarnation's progress words
        # (still in the pool) for its own.
        self._seq = random.getrandbits(24)
        if pool is not None:
            precise_sleeps()  # the wait for the reply looks at the holder's progress every 100 us, not every 150
        self.sock: socket.socket | None = None
        self._head = bytearray(_HEAD.size)
        self._buf = bytearray(0)  # grows to the largest block pulled, then reused

    def pull(self, key: int, timeout_s: float) -> Pulled:
        start = time.perf_counter()
        try:
            if self.sock is None:
                self.sock = socket.create_connection((self.host, self.port), timeout=timeout_s)
                _tune(self.sock)
            self.sock.settimeout(timeout_s)
            self._seq = (self._seq + 1) & SEQ_MASK
            self.sock.sendall(_REQ.pack(OP_GET if self.pool is None else OP_GET_SHM, key, self.me, self._seq))
            early = self._copy_while_waiting(start + timeout_s) if self.pool is not None else (0, 0)
            if _recv_into(self.sock, memoryview(self._head)) is None:
                raise ConnectionResetError("peer closed the connection")
            status, got, length = _HEAD.unpack(self._head)
            if got != key:
                raise PullError("corrupt", f"asked for block {key}, got {got}")
            if status == NOT_HELD:
                return Pulled(key, None, time.perf_counter() - start)
            need = length + _TRAILER.size
            if len(self._buf) < need:
                self._buf = bytearray(need)
            view = memoryview(self._buf)[:need]
            if self.pool is None:
                value = _recv_into(self.sock, view, checked=length)
            elif _recv_into(self.sock, view[length:]) is not None:  # the trailer; the block is in the pool
                done, value = early
                if done < length:  # what came after the last look at the progress word
                    view[done:length] = self.pool.slot_view(self.holder, self.me, length)[done:]
                    value = checksum(view[done:length], value)
            else:
                value = None
            if value is None:
                raise ConnectionResetError("peer closed the connection mid-block")
        except TimeoutError as exc:
            self.close()
            raise PullError("timeout", f"no reply from {self.host}:{self.port} in {timeout_s * 1e3:.0f} ms") from exc
        except PullError:
            self.close()
            raise
        except (ConnectionRefusedError, ConnectionResetError, BrokenPipeError) as exc:
            self.close()  # nobody listens there any more: the peer is gone (or restarting)
            raise PullError("refused", f"{self.host}:{self.port}: {exc}") from exc
        except OSError as exc:
            self.close()  # no route (a link down): like a lost reply, the peer may still be alive
            raise PullError("unreachable", f"{self.host}:{self.port}: {exc}") from exc
        seconds = time.perf_counter() - start
        (sent,) = _TRAILER.unpack(view[length:])
        if value != sent:
            raise PullError("corrupt", f"block {key} from {self.host}:{self.port} failed its checksum")
        return Pulled(key, view[:length], seconds)

    def _copy_while_waiting(self, deadline: float) -> tuple[int, int]:
        """Until the reply is readable: copy out of the pool each slice the holder has finished for this pull,
        extending the checksum; (bytes copied, their CRC-32C)."""
        assert self.pool is not None and self.sock is not None
        pool, sock = self.pool, self.sock
        size = pool.spec.slot_bytes
        if len(self._buf) < size + _TRAILER.size:
            self._buf = bytearray(size + _TRAILER.size)
        buf = memoryview(self._buf)
        done = value = 0
        while True:
            readable, _, _ = select.select([sock], [], [], POLL_S)
            seq, upto = pool.progress(self.holder, self.me)
            if seq == self._seq and upto > done:
                buf[done:upto] = pool.slot_view(self.holder, self.me, upto)[done:]
                value = checksum(buf[done:upto], value)
                done = upto
            if readable:
                return done, value
            if time.perf_counter() > deadline:
                raise TimeoutError("no reply in time")

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def _recv_into(sock: socket.socket, view: memoryview, checked: int = 0) -> int | None:
    """Fill `view` from the socket; None if the peer closed first, else the CRC-32C of its first `checked` bytes,
    extended over each piece as it lands (the checksum overlaps the receive)."""
    n = len(view)
    got = 0
    value = 0
    lowat = 1
    while got < n:
        want = min(n - got, RECV_LOWAT) if checked else 1
        if want != lowat:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, want)
            lowat = want
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            return None
        if got < checked:
            value = checksum(view[got:min(got + k, checked)], value)
        got += k
    if lowat != 1:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
    return value
