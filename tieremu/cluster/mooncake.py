"""The Mooncake transport: a pull's payload moves by Mooncake's Transfer Engine (the `mooncake-transfer-engine-non-cuda`
package, its TCP transport, peers found by its P2P handshake: no metadata server), `--transport mooncake`.

Design: the control exchange stays the TCP transport's (tieremu.cluster.wire: request, reply head, CRC-32C
trailer), so the peer index, the holder's lock, a dead peer (refused), a partition and loss (no reply: timeout)
behave exactly as over the other transports; only the payload moves differently. Each instance starts an engine per
local address (one on loopback, one per veth link in network namespaces) and registers one buffer with each: n
staging slots (slot p holds the block this instance is serving to instance p) then n receive slots (slot h receives
what instance h serves). The holder waits out the link's latency, copies the block from its tier into the puller's
staging slot, extending the CRC-32C over each slice, and replies with the head and the checksum. The puller then
issues a `transfer_sync_read` from the holder's engine (its registered staging slot) into its own receive slot and
checks the CRC over the bytes that arrived: a block corrupted in transit is refused like a corrupted TCP block.
Mooncake shapes nothing: on loopback the transport paces the holder's copy at the link's rate; in namespaces the
engines' TCP crosses the tbf-shaped veths. Delay, jitter and loss are the transport's, on the control reply.

The staging object quacks like the shared-memory pool (tieremu.cluster.shm) where wire.BlockServer and
wire.BlockClient use it (slot_view, claim, write, progress): the view of one's own slot is local memory; the view of
a peer's slot is read by the Transfer Engine. A peer's engine address (its handshake `host:port`, chosen by the
engine, and its buffer's address) is asked of the peer once, over the control socket, as a plain TCP pull of the
reserved hash id DESCRIBE_KEY; it is asked again after a failed read (the peer may have restarted).
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from tieremu.cluster.shm import slot_bytes
from tieremu.cluster.wire import BlockClient, PullError
from tieremu.errors import ConfigError, PlacementError

PACKAGE = "mooncake-transfer-engine-non-cuda"
SETUP = "scripts/setup-mooncake.sh"
DESCRIBE_KEY = 2**64 - 2  # a hash id no trace has: the reply is the holder's engine address (session, buffer)
DESCRIBE_TIMEOUT_S = 2.0
# The engine logs every connection at INFO on stderr (MC_LOG_LEVEL is its own knob); errors stay.
LOG_ENV = {"MC_LOG_LEVEL": "ERROR"}


def available() -> str | None:
    """None when the Transfer Engine imports here, else why not."""
    for key, value in LOG_ENV.items():  # read when the library loads
        os.environ.setdefault(key, value)
    try:
        from mooncake.engine import TransferEngine  # noqa: F401
    except ImportError as exc:
        return str(exc)
    return None


def require() -> None:
    """ConfigError naming the setup script when the package is missing, before any work."""
    why = available()
    if why is not None:
        raise ConfigError(f"--transport mooncake needs the {PACKAGE} package ({why}): run `bash {SETUP}` (it installs "
                          "the version pinned in pyproject.toml's `mooncake` extra into .venv)")


@dataclass(frozen=True)
class StageSpec:
    """What an instance needs to start its engines and reach its peers' control sockets."""

    instances: int
    block_bytes: int
    hosts: dict[int, str]  # peer -> this instance's address on the link to it (an engine's local hostname)
    peers: dict[int, tuple[str, int]]  # peer -> (its address on that link, its block port): where to ask

    @property
    def slot_bytes(self) -> int:
        return slot_bytes(self.block_bytes)

    def to_json(self) -> dict[str, Any]:
        return {"instances": self.instances, "block_bytes": self.block_bytes,
                "hosts": {str(j): h for j, h in self.hosts.items()},
                "peers": {str(j): list(p) for j, p in self.peers.items()}}

    @classmethod
    def of_json(cls, d: dict[str, Any]) -> StageSpec:
        return cls(int(d["instances"]), int(d["block_bytes"]), {int(j): str(h) for j, h in d["hosts"].items()},
                   {int(j): (str(p[0]), int(p[1])) for j, p in d["peers"].items()})


class MooncakeStage:
    """This instance's Transfer Engines and their registered buffer (staging slots, then receive slots).

    One engine per local address: an engine's TCP transport is reached at the address it was started with (a peer
    connects to the host in the engine's name), and in network namespaces each link to a peer has its own address,
    so each link gets its own engine, all registering the same buffer. On loopback one engine serves every peer."""

    def __init__(self, spec: StageSpec, me: int) -> None:
        require()
        from mooncake.engine import TransferEngine

        self.spec, self.me = spec, me
        self._lock = threading.Lock()
        self._owner: dict[int, int] = {}  # staging slot (puller) -> the claim that owns it
        self._claims = 0
        self._peers: dict[int, tuple[str, int]] = {}  # holder -> (its engine's session, its buffer's address)
        n, size = spec.instances, spec.slot_bytes
        self._map = mmap.mmap(-1, 2 * n * size)  # anonymous, page-aligned, faulted in below
        self.buf = np.frombuffer(self._map, dtype=np.uint8)
        self.buf[:] = 0
        self.view = memoryview(self._map)
        self.addr = int(self.buf.ctypes.data)
        self.engines: dict[str, Any] = {}  # local address -> its engine
        for host in sorted(set(spec.hosts.values())):
            engine = self.engines[host] = TransferEngine()
            rc = engine.initialize(host, "P2PHANDSHAKE", "tcp", "")
            if rc != 0:
                raise PlacementError(f"Mooncake TransferEngine.initialize({host!r}, 'P2PHANDSHAKE', 'tcp') "
                                     f"returned {rc}")
            rc = engine.register_memory(self.addr, len(self._map))
            if rc != 0:
                raise PlacementError(f"Mooncake register_memory of {len(self._map)} bytes on {host} returned {rc}")
        self.ports = {host: int(engine.get_rpc_port()) for host, engine in self.engines.items()}
        self._closed = False

    # -- what wire.BlockServer uses (this instance as the holder) ------------------------------------------------

    def slot_view(self, holder: int, puller: int, nbytes: int) -> memoryview:
        """The (holder, puller) slot's first `nbytes` as this instance sees them: its own staging slot, or a peer's
        staging slot read by the Transfer Engine into this instance's receive slot for that peer."""
        if nbytes > self.spec.slot_bytes:
            raise PlacementError(f"a block of {nbytes} bytes does not fit the {self.spec.slot_bytes}-byte staging "
                                 "slots")
        if holder == self.me:
            start = puller * self.spec.slot_bytes
            return self.view[start:start + nbytes]
        return self._read(holder, nbytes)

    def claim(self, holder: int, puller: int, seq: int) -> int:
        """Make the staging slot the newest pull's: an older one still being served writes nothing more."""
        with self._lock:
            self._claims += 1
            self._owner[puller] = self._claims
            return self._claims

    def write(self, holder: int, puller: int, token: int, offset: int, data: memoryview) -> bool:
        with self._lock:
            if self._owner.get(puller) != token:
                return False
            start = puller * self.spec.slot_bytes + offset
            self.view[start:start + len(data)] = data
        return True

    def describe(self) -> bytes:
        """Where this instance's engines are (each local address's handshake port) and its buffer's address: the
        reply to a DESCRIBE_KEY pull."""
        return json.dumps({"ports": self.ports, "addr": self.addr}).encode()

    # -- what wire.BlockClient uses (this instance as the puller) ------------------------------------------------

    def progress(self, holder: int, puller: int) -> tuple[int, int]:
        """Nothing lands in this instance's memory before the reply: the read starts after it (the sequence number
        -1 matches no pull, so the client copies nothing early)."""
        return -1, 0

    def _read(self, holder: int, nbytes: int) -> memoryview:
        size = self.spec.slot_bytes
        local = (self.spec.instances + holder) * size
        cached = holder in self._peers
        engine = self.engines[self.spec.hosts[holder]]  # the one on the link to the holder
        session, base = self._peer(holder)
        rc = engine.transfer_sync_read(session, self.addr + local, base + self.me * size, nbytes)
        if rc != 0:
            self._peers.pop(holder, None)
            if not cached:
                raise PullError("unreachable", f"Mooncake transfer_sync_read from {session} returned {rc}")
            # The holder answered on its control socket, so it is alive: it may have restarted with a new engine.
            # Ask where its engine is now, once.
            session, base = self._peer(holder)
            rc = engine.transfer_sync_read(session, self.addr + local, base + self.me * size, nbytes)
            if rc != 0:
                self._peers.pop(holder, None)
                raise PullError("unreachable", f"Mooncake transfer_sync_read from {session} returned {rc}")
        return self.view[local:local + nbytes]

    def _peer(self, holder: int) -> tuple[str, int]:
        known = self._peers.get(holder)
        if known is not None:
            return known
        host, port = self.spec.peers[holder]
        client = BlockClient(host, port)  # a plain TCP pull: the answer comes on the socket
        try:
            reply = client.pull(DESCRIBE_KEY, DESCRIBE_TIMEOUT_S)
        finally:
            client.close()
        if reply.payload is None:
            raise PullError("refused", f"{host}:{port} has no Mooncake engine to describe")
        d = json.loads(bytes(reply.payload))
        if host not in d["ports"]:
            raise PullError("refused", f"{host}:{port} runs no Mooncake engine on {host} (its engines: {d['ports']})")
        known = self._peers[holder] = (f"{host}:{d['ports'][host]}", int(d["addr"]))
        return known

    @property
    def nbytes(self) -> int:
        return len(self._map)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for engine in self.engines.values():
            with contextlib.suppress(Exception):
                engine.unregister_memory(self.addr)
        # The engine's threads may still touch the buffer until it is gone; the mapping is left to the process's end.
