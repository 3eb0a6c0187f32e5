"""The block transport: TCP between instances, every block checksummed end to end, the link shaped per message.

A pull is one request (op, hash id) and one reply (status, hash id, length, BLAKE2b-128 of the payload, payload).
The server reads the block from its tier's memory under the cache's lock, hashes it there, and sends it after the
link's latency (plus uniform jitter), dropping the reply with the link's loss probability; where the kernel does
not shape the rate (loopback) it also paces the payload at the link's bandwidth in 16 KiB slices. The client
verifies the checksum before anything is stored: a block that fails it is counted as corrupted and recomputed.

The delays are paid by a precise wait (sleep to within 200 us, then spin), the way a NIC's latency is paid by
waiting for it: that is the emulated link's behaviour, not work stood in for.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from tieremu.cluster.link import LinkSpec

OP_GET = 1
OK, NOT_HELD = 0, 1
_REQ = struct.Struct("!BQ")
_REPLY = struct.Struct("!BQQ16s")
SLICE = 16 * 1024
SPIN_S = 200e-6


def digest(data: bytes | memoryview) -> bytes:
    """The end-to-end checksum of a block's bytes (16-byte BLAKE2b)."""
    return hashlib.blake2b(data, digest_size=16).digest()


def wait_until(due: float) -> None:
    """Wait until time.perf_counter() reaches `due`: sleep the bulk, spin the last 200 us."""
    while True:
        left = due - time.perf_counter()
        if left <= 0:
            return
        if left > SPIN_S:
            time.sleep(left - SPIN_S)


@dataclass
class LinkState:
    """One outgoing link's current settings (a partition sets loss to 1 while it lasts)."""

    spec: LinkSpec
    pace: bool  # the transport paces the bytes (the kernel does not shape this link's rate)
    partitioned: bool = False


BlockReader = Callable[[int], "bytes | None"]  # hash id -> the block's bytes, None if not held


class BlockServer:
    """Serves pulls of this instance's blocks on (host, port), one thread per connection."""

    def __init__(self, host: str, port: int, read: BlockReader, links: Callable[[str], LinkState],
                 seed: int = 0) -> None:
        self.read = read
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
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._serve, args=(conn, addr[0]), daemon=True).start()

    def _serve(self, conn: socket.socket, peer: str) -> None:
        with conn:
            while True:
                try:
                    head = _recv_exact(conn, _REQ.size)
                except OSError:
                    return
                if head is None:
                    return
                start = time.perf_counter()
                with self._lock:
                    self.inflight += 1
                try:
                    if not self._reply(conn, peer, head, start):
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
        _op, key = _REQ.unpack(head)
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
                conn.sendall(_REPLY.pack(NOT_HELD, key, 0, bytes(16)))
                return True
            header = _REPLY.pack(OK, key, len(payload), digest(payload))
            wait_until(due)
            self._send(conn, header, payload, link, due)
        except OSError:
            return False
        with self._lock:
            self.served += 1
            self.served_bytes += len(payload)
        return True

    @staticmethod
    def _send(conn: socket.socket, header: bytes, payload: bytes, link: LinkState, start: float) -> None:
        if not link.pace:
            conn.sendall(header + payload)
            return
        conn.sendall(header)
        view = memoryview(payload)
        per_byte = 8 / (link.spec.gbps * 1e9)
        for offset in range(0, len(view), SLICE):
            piece = view[offset:offset + SLICE]
            conn.sendall(piece)
            wait_until(start + (offset + len(piece)) * per_byte)  # the slice has left when the link says so

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
    payload: bytes | None  # None: the peer does not hold the block (a stale index entry)
    seconds: float


class BlockClient:
    """Pulls blocks from one peer over a persistent connection (reopened after any failure)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.sock: socket.socket | None = None

    def pull(self, key: int, timeout_s: float) -> Pulled:
        start = time.perf_counter()
        try:
            if self.sock is None:
                self.sock = socket.create_connection((self.host, self.port), timeout=timeout_s)
                self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sock.settimeout(timeout_s)
            self.sock.sendall(_REQ.pack(OP_GET, key))
            head = _recv_exact(self.sock, _REPLY.size)
            if head is None:
                raise ConnectionResetError("peer closed the connection")
            status, got, length, check = _REPLY.unpack(head)
            if got != key:
                raise PullError("corrupt", f"asked for block {key}, got {got}")
            if status == NOT_HELD:
                return Pulled(key, None, time.perf_counter() - start)
            payload = _recv_exact(self.sock, length)
            if payload is None:
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
        if digest(payload) != check:
            raise PullError("corrupt", f"block {key} from {self.host}:{self.port} failed its checksum")
        return Pulled(key, payload, seconds)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            return None
        got += k
    return bytes(buf)
