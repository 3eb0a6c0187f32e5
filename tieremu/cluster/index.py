"""Who holds which block, with no central server: a replica fed by every peer's KV events (broadcast) or home
instances chosen by consistent hashing (hash).

Every instance numbers the events it sends on each stream (stored / evicted, with the hash ids) and sends a
heartbeat carrying the stream's current number. A receiver applies a stream's events in number order, the way a
TCP receiver reassembles segments: an event that arrives ahead of its turn (reordered) waits in a reorder buffer
and is applied once the ones before it have come; one that arrives after its turn was already passed (a late
event, overtaken by a snapshot) is dropped, never applied, so a stale 'stored' can never undo a later 'evicted'.
A gap that lasts REORDER_HOLD_S (the missing events were dropped, not delayed: a heartbeat shows a higher number,
or later events sit in the buffer), or a buffer past MAX_PENDING events, or a new incarnation of the sender (a
restart) makes the receiver re-read the sender's holdings from it (a snapshot over the query socket) and carry on
from the snapshot's number, applying what it buffered beyond it. Every entry holds a lease that each event or
heartbeat from its sender renews: the entries of a sender that went silent expire. Nothing here trusts an entry
absolutely: a pull from a holder that no longer has the block is a stale miss the caller counts, never an error.

- broadcast: one PUB socket per instance, every peer subscribed: everyone keeps a replica of the global index and
  a lookup is local.
- hash: each hash id has `replicas` home instances on a ring of virtual nodes; an instance sends an event for a
  block only to its homes (PUSH), and a lookup asks the homes (DEALER -> ROUTER), the first that answers.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import zmq

from tieremu.cluster.ring import INDEXES, LEASE_S, ring_homes
from tieremu.errors import ConfigError

HEARTBEAT_S = 0.2
QUERY_TIMEOUT_S = 0.25
# A gap in a stream is given this long to fill (reordered events arriving late) before it is taken for loss and
# healed by a snapshot: two heartbeats, so a reordering shorter than that costs no snapshot.
REORDER_HOLD_S = 2 * HEARTBEAT_S
MAX_PENDING = 1024  # events buffered ahead of a gap before the receiver stops waiting and resyncs


@dataclass
class Holdings:
    """What one sender is known to hold, as of its event number `seq` of incarnation `inc`."""

    inc: int = -1
    seq: int = 0
    keys: set[int] = field(default_factory=set)
    lease_until: float = 0.0
    pending: dict[int, tuple[str, list[int]]] = field(default_factory=dict)  # seq -> (kind, keys), ahead of a gap
    gap_since: float | None = None  # when the current gap was first seen


def apply_in_order(h: Holdings) -> None:
    """Apply the buffered events that are next in number order (the reorder buffer's drain)."""
    for seq in sorted(s for s in h.pending if s <= h.seq):  # overtaken by a snapshot: already in its holdings
        del h.pending[seq]
    while h.seq + 1 in h.pending:
        kind, keys = h.pending.pop(h.seq + 1)
        h.seq += 1
        (h.keys.update if kind == "stored" else h.keys.difference_update)(keys)


@dataclass
class IndexStats:
    events_sent: int = 0
    events_received: int = 0
    events_dropped: int = 0  # fault injection: numbered but never sent
    events_reordered: int = 0  # fault injection: held back and sent after the next event on its stream
    out_of_order: int = 0  # received ahead of their turn and buffered until the gap before them filled
    late_ignored: int = 0  # received after their turn had passed (a snapshot covered them): not applied
    resyncs: int = 0
    lookups: int = 0
    lookup_failures: int = 0  # a hash lookup no home answered

    REPORTED = ("resyncs", "events_sent", "events_dropped", "events_reordered", "out_of_order", "late_ignored")

    @classmethod
    def reported(cls, stats: IndexStats | None) -> dict[str, int]:
        """The figures an instance reports in its result (every instance kind alike); zeros without an index."""
        return {name: getattr(stats, name) if stats is not None else 0 for name in cls.REPORTED}


@dataclass(frozen=True)
class Endpoints:
    host: str
    events: int  # PUB (broadcast) or PULL (hash)
    queries: int  # ROUTER


class PeerIndex:
    """One instance's part of the index, either design. `held()` must return this instance's resident hash ids
    (asked for snapshots); `queue_s()` its current backlog (sent with heartbeats, for the pull estimate)."""

    def __init__(self, design: str, me: int, incarnation: int, peers: dict[int, Endpoints], bind_host: str,
                 mine: Endpoints, held: Callable[[], set[int]], queue_s: Callable[[], float],
                 lease_s: float = LEASE_S, replicas: int = 2) -> None:
        if design not in INDEXES:
            raise ConfigError(f"unknown index {design!r}; valid: {', '.join(INDEXES)}")
        self.design, self.me, self.inc = design, me, incarnation
        self.peers = peers
        self.n = max([me, *peers]) + 1
        self.held, self.queue_s, self.lease_s, self.replicas = held, queue_s, lease_s, replicas
        self.stats = IndexStats()
        self.known: dict[int, Holdings] = {}  # sender -> what it holds (broadcast: all; hash: keys homed here)
        self.queues: dict[int, float] = {}  # sender -> its backlog at its last heartbeat, seconds
        self.lags: dict[int, float] = {}  # sender -> its wake-up lateness at its last heartbeat, seconds
        self.drop_next = 0
        # Fault injection: hold back this many events, each sent right after the next event on its stream (however
        # late that is: on an idle stream the receivers see the gap in heartbeats and resync first).
        self.reorder_next = 0
        self._held_back: dict[int, bytes] = {}  # stream -> the message held back
        self.lag_s = 0.0  # how late this process's receiving thread wakes: its share of a busy CPU, per wake-up
        self._seq: dict[int, int] = {}  # stream (destination, -1: broadcast) -> last number sent
        self._lock = threading.Lock()  # guards known/queues
        self._send_lock = threading.Lock()  # guards the sending sockets and _seq
        self.ctx = zmq.Context()
        self._closed = threading.Event()
        if design == "broadcast":
            self.pub = self._socket(zmq.PUB)
            self.pub.bind(f"tcp://{bind_host}:{mine.events}")
            self.sub = self._socket(zmq.SUB)
            self.sub.setsockopt(zmq.SUBSCRIBE, b"")
            for ep in peers.values():
                self.sub.connect(f"tcp://{ep.host}:{ep.events}")
        else:
            self.pull = self._socket(zmq.PULL)
            self.pull.bind(f"tcp://{bind_host}:{mine.events}")
            self.push = {}
            for p, ep in peers.items():
                sock = self._socket(zmq.PUSH)
                sock.setsockopt(zmq.SNDHWM, 100000)
                sock.connect(f"tcp://{ep.host}:{ep.events}")
                self.push[p] = sock
        self.router = self._socket(zmq.ROUTER)
        self.router.bind(f"tcp://{bind_host}:{mine.queries}")
        self._dealers: dict[tuple[str, int], zmq.Socket] = {}
        self._thread = threading.Thread(target=self._loop, name="peer-index", daemon=True)
        self._thread.start()

    def _socket(self, kind: int) -> zmq.Socket:
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        return sock

    # -- sending -------------------------------------------------------------------------------------------------

    def publish(self, kind: str, keys: Sequence[int]) -> None:
        """Tell the index this instance now holds (kind 'stored') or no longer holds ('evicted') `keys`."""
        if not keys:
            return
        with self._send_lock:
            if self.design == "broadcast":
                self._emit(-1, kind, list(keys))
                return
            by_home: dict[int, list[int]] = {}
            for key in keys:
                for home in ring_homes(key, self.n, self.replicas):
                    by_home.setdefault(home, []).append(key)
            for home, group in by_home.items():
                if home == self.me:
                    self._apply_own(kind, group)
                elif home in self.peers:
                    self._emit(home, kind, group)

    def _emit(self, stream: int, kind: str, keys: list[int], count: bool = True) -> None:
        """Number and send one message on a stream (caller holds _send_lock). A heartbeat is not numbered."""
        if count:
            self._seq[stream] = self._seq.get(stream, 0) + 1
            if self.drop_next > 0:  # fault injection: the number is spent, the event lost
                self.drop_next -= 1
                self.stats.events_dropped += 1
                return
        msg = json.dumps({"o": self.me, "inc": self.inc, "seq": self._seq.get(stream, 0), "k": kind, "keys": keys,
                          "q": self.queue_s(), "lag": self.lag_s}).encode()
        if count and self.reorder_next > 0 and stream not in self._held_back:
            self.reorder_next -= 1  # fault injection: this event goes out after the next one on its stream
            self.stats.events_reordered += 1
            self._held_back[stream] = msg
            return
        self._send(stream, msg, count)
        if count and stream in self._held_back:
            self._send(stream, self._held_back.pop(stream), True)

    def _send(self, stream: int, msg: bytes, count: bool) -> None:
        try:
            if stream == -1:
                self.pub.send(msg, zmq.NOBLOCK)
            else:
                self.push[stream].send(msg, zmq.NOBLOCK)
            if count:
                self.stats.events_sent += 1
        except zmq.Again:  # the peer is gone or slow: its replica will see the gap and resync
            pass

    def _apply_own(self, kind: str, keys: list[int]) -> None:
        with self._lock:
            own = self.known.setdefault(self.me, Holdings(inc=self.inc))
            own.lease_until = float("inf")
            (own.keys.update if kind == "stored" else own.keys.difference_update)(keys)

    def _heartbeat(self) -> None:
        with self._send_lock:
            streams = [-1] if self.design == "broadcast" else list(self.push)
            for stream in streams:
                self._emit(stream, "hb", [], count=False)

    # -- receiving -----------------------------------------------------------------------------------------------

    def _loop(self) -> None:
        poller = zmq.Poller()
        inbox = self.sub if self.design == "broadcast" else self.pull
        poller.register(inbox, zmq.POLLIN)
        poller.register(self.router, zmq.POLLIN)
        next_beat = 0.0
        while not self._closed.is_set():
            now = time.monotonic()
            if now >= next_beat:
                self._heartbeat()
                next_beat = now + HEARTBEAT_S
            asked = time.monotonic()
            try:
                ready = dict(poller.poll(timeout=50))
            except zmq.ZMQError:
                return
            if not ready:  # a timed-out wait: how late it returned is how long a request here waits for a CPU
                late = max(0.0, time.monotonic() - asked - 0.05)
                self.lag_s += 0.2 * (late - self.lag_s)
            if inbox in ready:
                while True:
                    try:
                        self._on_event(json.loads(inbox.recv(zmq.NOBLOCK)))
                    except zmq.Again:
                        break
            if self.router in ready:
                while True:
                    try:
                        ident, _, body = self.router.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self.router.send_multipart([ident, b"", json.dumps(self._answer(json.loads(body))).encode()])

    def _on_event(self, msg: dict) -> None:
        origin, inc, seq, kind = msg["o"], msg["inc"], msg["seq"], msg["k"]
        self.stats.events_received += 1
        now = time.monotonic()
        with self._lock:
            h = self.known.setdefault(origin, Holdings())
            self.queues[origin] = float(msg.get("q", 0.0))
            self.lags[origin] = float(msg.get("lag", 0.0))
            h.lease_until = now + self.lease_s
            if inc != h.inc:  # a new process (or the first word from this sender): start from a snapshot
                h.inc, h.seq, h.keys, h.pending, h.gap_since = inc, 0, set(), {}, None
                resync = True
            else:
                if kind != "hb":
                    if seq <= h.seq:
                        self.stats.late_ignored += 1  # its turn has passed: a snapshot already covered it
                    elif seq == h.seq + 1:
                        h.seq = seq
                        (h.keys.update if kind == "stored" else h.keys.difference_update)(msg["keys"])
                        apply_in_order(h)
                    else:
                        self.stats.out_of_order += 1
                        h.pending[seq] = (kind, msg["keys"])
                behind = bool(h.pending) or (kind == "hb" and seq > h.seq)
                if not behind:
                    h.gap_since = None
                elif h.gap_since is None:
                    h.gap_since = now
                resync = behind and (now - h.gap_since >= REORDER_HOLD_S or len(h.pending) > MAX_PENDING)
        if resync:
            self._resync(origin)

    def _resync(self, origin: int) -> None:
        """Re-read `origin`'s holdings (those homed here, for hash) and its stream's number."""
        self.stats.resyncs += 1
        reply = self._ask(origin, {"op": "snapshot", "for": self.me})
        if reply is None:
            return  # it will be asked again at its next event or heartbeat
        with self._lock:
            h = self.known.setdefault(origin, Holdings())
            if reply["inc"] != h.inc and h.inc != -1 and reply["inc"] < h.inc:
                return
            h.inc, h.seq, h.keys = reply["inc"], reply["seq"], set(reply["keys"])
            h.lease_until = time.monotonic() + self.lease_s
            apply_in_order(h)  # what was buffered beyond the snapshot's number still applies
            h.gap_since = time.monotonic() if h.pending else None

    def _answer(self, query: dict) -> dict:
        if query["op"] == "snapshot":
            asker = query["for"]
            with self._send_lock:  # the number and the holdings together
                stream = -1 if self.design == "broadcast" else asker
                seq = self._seq.get(stream, 0)
                keys = self.held()
            if self.design == "hash":
                keys = {k for k in keys if asker in ring_homes(k, self.n, self.replicas)}
            return {"inc": self.inc, "seq": seq, "keys": sorted(keys)}
        if query["op"] == "who":
            return {"holders": {str(k): self._local_holders(k) for k in query["keys"]}}
        return {"error": f"unknown op {query['op']!r}"}

    def _ask(self, peer: int, query: dict, timeout_s: float = QUERY_TIMEOUT_S) -> dict | None:
        """One request to a peer's ROUTER; None if it does not answer in time. Called from one thread at a time
        per peer address (the receiving thread asks for snapshots, the replay thread asks homes)."""
        ep = self.peers.get(peer)
        if ep is None:
            return None
        slot = (threading.current_thread().name, peer)
        sock = self._dealers.get(slot)
        if sock is None:
            sock = self._dealers[slot] = self._socket(zmq.DEALER)
            sock.connect(f"tcp://{ep.host}:{ep.queries}")
        sock.send_multipart([b"", json.dumps(query).encode()])
        if sock.poll(int(timeout_s * 1e3)):
            _, body = sock.recv_multipart()
            return json.loads(body)
        sock.close()  # a late reply must not answer the next question
        del self._dealers[slot]
        return None

    # -- lookups -------------------------------------------------------------------------------------------------

    def _local_holders(self, key: int) -> list[int]:
        now = time.monotonic()
        with self._lock:
            return sorted(o for o, h in self.known.items() if key in h.keys and h.lease_until > now)

    def lookup(self, keys: Iterable[int], avoid: set[int] = frozenset()) -> dict[int, list[int]]:
        """Holders other than this instance (and `avoid`) of each key that has any."""
        keys = list(keys)
        self.stats.lookups += 1
        found: dict[int, list[int]] = {}
        if self.design == "broadcast":
            for key in keys:
                found[key] = self._local_holders(key)
        else:
            by_home: dict[tuple[int, ...], list[int]] = {}
            for key in keys:
                by_home.setdefault(ring_homes(key, self.n, self.replicas), []).append(key)
            for homes, group in by_home.items():
                answer = None
                for home in homes:
                    if home == self.me:
                        answer = {str(k): self._local_holders(k) for k in group}
                        break
                    if home in avoid:
                        continue
                    reply = self._ask(home, {"op": "who", "keys": group})
                    if reply is not None:
                        answer = reply["holders"]
                        break
                if answer is None:
                    self.stats.lookup_failures += 1
                    continue
                for key in group:
                    found[key] = answer.get(str(key), [])
        return {k: [h for h in hs if h != self.me and h not in avoid] for k, hs in found.items()
                if any(h != self.me and h not in avoid for h in hs)}

    def entries(self) -> dict[int, list[int]]:
        """Live entries by sender (for the end-of-run check that the index healed)."""
        now = time.monotonic()
        with self._lock:
            return {o: sorted(h.keys) for o, h in self.known.items() if o != self.me and h.lease_until > now}

    def queue_of(self, peer: int) -> float:
        with self._lock:
            return self.queues.get(peer, 0.0)

    def lag_of(self, peer: int) -> float:
        with self._lock:
            return self.lags.get(peer, 0.0)

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=2)
        self.ctx.destroy(linger=0)
