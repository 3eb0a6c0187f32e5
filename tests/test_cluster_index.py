"""The peer index without instances: sequence gaps resync, restarts reset, leases expire, hash homes are
consistent; and the block transport's end-to-end checksum, loss and stale replies. Loopback only, no torch."""

from __future__ import annotations

import hashlib
import random
import socket
import time

import pytest

from tieremu.cluster.index import REORDER_HOLD_S, Endpoints, PeerIndex
from tieremu.cluster.link import LinkSpec, parse_link
from tieremu.cluster.ring import ring_homes
from tieremu.cluster.wire import BlockClient, BlockServer, LinkState, PullError
from tieremu.errors import ConfigError


def _ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _pair(design: str, lease_s: float = 1.5, inc_b: int = 0) -> tuple[PeerIndex, PeerIndex, set[int], set[int]]:
    p = _ports(4)
    eps = {0: Endpoints("127.0.0.1", p[0], p[1]), 1: Endpoints("127.0.0.1", p[2], p[3])}
    held_a: set[int] = set()
    held_b: set[int] = set()
    a = PeerIndex(design, 0, 0, {1: eps[1]}, "127.0.0.1", eps[0], lambda: set(held_a), lambda: 0.0, lease_s=lease_s)
    b = PeerIndex(design, 1, inc_b, {0: eps[0]}, "127.0.0.1", eps[1], lambda: set(held_b), lambda: 0.0,
                  lease_s=lease_s)
    return a, b, held_a, held_b


def _until(check, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return True
        time.sleep(0.02)
    return False


@pytest.mark.parametrize("design", ["broadcast", "hash"])
def test_events_reach_the_index_and_dropped_events_are_healed_by_resync(design: str) -> None:
    a, b, _, held_b = _pair(design)
    try:
        keys = list(range(40))
        held_b.update(keys)
        time.sleep(0.3)  # let the subscription settle (a lost first event is also a gap)
        b.publish("stored", keys)
        assert _until(lambda: a.lookup(keys) == {k: [1] for k in keys})
        # Lost events: numbered, never sent. The receiver sees the jump at the next heartbeat and re-reads.
        before = a.stats.resyncs
        b.drop_next = 5
        more = list(range(100, 140))
        held_b.update(more)
        b.publish("stored", more)
        assert b.stats.events_dropped >= 1
        assert _until(lambda: a.lookup(more) == {k: [1] for k in more})
        assert a.stats.resyncs > before
        # An eviction is seen too.
        held_b.difference_update(keys)
        b.publish("evicted", keys)
        assert _until(lambda: a.lookup(keys) == {})
    finally:
        a.close()
        b.close()


def test_a_silent_peer_expires_with_its_lease() -> None:
    a, b, _, held_b = _pair("broadcast", lease_s=0.5)
    try:
        held_b.update(range(10))
        time.sleep(0.3)
        b.publish("stored", list(range(10)))
        assert _until(lambda: bool(a.lookup(range(10))))
        b.close()  # stops its heartbeats
        assert _until(lambda: a.lookup(range(10)) == {}, timeout=3)
    finally:
        a.close()


@pytest.mark.parametrize("design", ["broadcast", "hash"])
def test_a_restarted_peer_replaces_its_old_entries(design: str) -> None:
    p = _ports(4)
    eps = {0: Endpoints("127.0.0.1", p[0], p[1]), 1: Endpoints("127.0.0.1", p[2], p[3])}
    a = PeerIndex(design, 0, 0, {1: eps[1]}, "127.0.0.1", eps[0], set, lambda: 0.0, lease_s=30)
    old = PeerIndex(design, 1, 0, {0: eps[0]}, "127.0.0.1", eps[1], lambda: set(range(10)), lambda: 0.0)
    try:
        time.sleep(0.3)
        old.publish("stored", list(range(10)))
        assert _until(lambda: len(a.lookup(range(10))) == 10)
        old.close()
        new = PeerIndex(design, 1, 1, {0: eps[0]}, "127.0.0.1", eps[1], lambda: {50}, lambda: 0.0)
        try:  # the lease is long: only the new incarnation's word can clear the old entries
            assert _until(lambda: a.lookup(range(10)) == {} and a.lookup([50]) == {50: [1]})
        finally:
            new.close()
    finally:
        a.close()


def _textbook_holdings(events: list[tuple[int, str, list[int]]]) -> set[int]:
    """What a sender holds, the textbook way: its events applied one after the other in the order it numbered them."""
    held: set[int] = set()
    for _seq, kind, keys in sorted(events):
        (held.update if kind == "stored" else held.difference_update)(keys)
    return held


def _deliver(index: PeerIndex, origin: int, seq: int, kind: str, keys: list[int]) -> None:
    index._on_event({"o": origin, "inc": 0, "seq": seq, "k": kind, "keys": keys, "q": 0.0, "lag": 0.0})


def test_reordered_events_are_applied_in_number_order_like_the_textbook() -> None:
    # A sender (origin 7, not a peer: its snapshot cannot be fetched, so a resync would leave a trace) stores and
    # evicts overlapping keys; its events reach the receiver shuffled (but never later than REORDER_HOLD_S). The
    # receiver's holdings for it must equal the events applied in number order, never the arrival order.
    rng = random.Random(18)
    a = PeerIndex("broadcast", 0, 0, {}, "127.0.0.1", Endpoints("127.0.0.1", *_ports(2)), set, lambda: 0.0)
    try:
        _deliver(a, 7, 0, "hb", [])  # first word from the sender: the (failed) snapshot sets its incarnation
        assert a.stats.resyncs == 1
        seq = 0
        for trial in range(30):
            events = []
            for _ in range(rng.randint(2, 8)):
                seq += 1
                events.append((seq, rng.choice(["stored", "evicted"]), rng.sample(range(12), rng.randint(1, 4))))
            for event in [*rng.sample(events, len(events))]:
                _deliver(a, 7, *event)
            truth = _textbook_holdings([(s, k, ks) for s, k, ks in all_events]) if (
                all_events := [*locals().get("all_events", []), *events]) else set()
            assert set(a.known[7].keys) == truth, trial
            assert a.known[7].seq == seq and not a.known[7].pending
        assert a.stats.out_of_order > 0  # the shuffles did put events ahead of their turn
        assert a.stats.resyncs == 1  # and every gap filled from the buffer, no snapshot needed
        # The case the buffer is for: 'stored' overtaken by the 'evicted' that followed it. Applied on arrival the
        # late 'stored' would list a block the sender no longer holds.
        _deliver(a, 7, seq + 2, "evicted", [99])
        assert 99 not in a.known[7].keys
        _deliver(a, 7, seq + 1, "stored", [99])
        assert 99 not in a.known[7].keys
        # A gap that does not fill (the event was lost, not delayed) ends in a resync once REORDER_HOLD_S passed.
        _deliver(a, 7, seq + 4, "stored", [5])
        assert a.stats.resyncs == 1 and a.known[7].pending
        time.sleep(REORDER_HOLD_S + 0.05)
        _deliver(a, 7, seq + 4, "hb", [])
        assert a.stats.resyncs == 2
        # An event whose turn has passed is not applied.
        _deliver(a, 7, 1, "stored", [77])
        assert 77 not in a.known[7].keys and a.stats.late_ignored == 1
    finally:
        a.close()


@pytest.mark.parametrize("design", ["broadcast", "hash"])
def test_a_sender_that_reorders_its_events_is_healed_without_a_snapshot(design: str) -> None:
    a, b, _, held_b = _pair(design, lease_s=30)
    try:
        time.sleep(0.3)
        held_b.add(1)
        b.publish("stored", [1])
        # What a lists for b (with 2 instances every key is homed at both, so for hash too a's own view):
        def listed() -> set[int]:
            return set(a.entries().get(1, []))
        assert _until(lambda: 1 in listed())  # a has b's snapshot: from here on only events change it
        resyncs = a.stats.resyncs
        b.reorder_next = 4
        keys = list(range(200, 240))
        held_b.update(keys)
        b.publish("stored", keys)  # held back, then sent after the eviction that follows it
        held_b.difference_update(keys[:20])
        b.publish("evicted", keys[:20])
        assert b.stats.events_reordered == 1
        assert _until(lambda: listed() == {1, *keys[20:]})
        assert a.stats.out_of_order >= 1
        assert a.stats.resyncs == resyncs  # reassembled from the buffer, no snapshot
        # A held-back event whose successor is long in coming: the heartbeats show the gap, a snapshot heals it...
        held_b.add(300)
        b.publish("stored", [300])
        assert b.stats.events_reordered == 2
        assert _until(lambda: 300 in listed())
        assert a.stats.resyncs == resyncs + 1
        # ...and when it comes, after the eviction that followed it, its turn has passed: not applied.
        held_b.discard(300)
        b.publish("evicted", [300])
        assert _until(lambda: a.stats.late_ignored >= 1)
        assert 300 not in listed()
    finally:
        a.close()
        b.close()


def _textbook_homes(key: int, n: int, replicas: int, vnodes: int = 32) -> tuple[int, ...]:
    """Consistent hashing as the textbook has it: sort the virtual nodes, walk clockwise from the key's point."""
    def point(text: str) -> int:
        return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")
    ring = sorted((point(f"i{i}v{v}"), i) for i in range(n) for v in range(vnodes))
    k = point(f"k{key}")
    start = next((i for i, (pt, _) in enumerate(ring) if pt >= k), 0)
    homes: list[int] = []
    for step in range(len(ring)):
        owner = ring[(start + step) % len(ring)][1]
        if owner not in homes:
            homes.append(owner)
        if len(homes) == min(replicas, n):
            break
    return tuple(homes)


def test_ring_homes_match_the_textbook_and_move_little_when_an_instance_joins() -> None:
    for key in range(500):
        assert ring_homes(key, 4) == _textbook_homes(key, 4, 2)
    moved = sum(ring_homes(k, 4, 1) != ring_homes(k, 5, 1) for k in range(2000))
    assert moved < 2000 * 0.4  # about 1/5 move to the newcomer; a modulo hash would move 4/5


def _server(payload: dict[int, bytes], link: LinkSpec, pace: bool = True) -> BlockServer:
    state = LinkState(link, pace=pace)
    return BlockServer("127.0.0.1", 0, payload.get, lambda _host: state)


def test_pull_verifies_the_checksum_and_reports_stale_and_lost_replies(monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = {7: bytes(range(256)) * 64}
    server = _server(blocks, LinkSpec(10, 1))
    port = server.sock.getsockname()[1]
    client = BlockClient("127.0.0.1", port)
    try:
        got = client.pull(7, 1.0)
        assert got.payload == blocks[7]
        assert got.seconds >= LinkSpec(10, 1).seconds(len(blocks[7])) * 0.9  # paced at 1 Gb/s: ~140 us
        assert client.pull(8, 1.0).payload is None  # not held: the caller counts a stale miss
        # A byte flipped after the sender's checksum (a bad link or memory): refused, never returned.
        import tieremu.cluster.wire as wire
        real = wire._put

        def flip(conn, *pieces):  # the head and the first slice, already checksummed: flip the slice's first byte
            if len(pieces) == 2 and len(pieces[1]) > wire._TRAILER.size:
                pieces = (pieces[0], bytes([pieces[1][0] ^ 1]) + bytes(pieces[1][1:]))
            real(conn, *pieces)
        monkeypatch.setattr(wire, "_put", flip)
        with pytest.raises(PullError) as err:
            client.pull(7, 1.0)
        assert err.value.kind == "corrupt"
    finally:
        client.close()
        server.close()
    lossy = _server(blocks, LinkSpec(10, 1, loss=1.0))
    client = BlockClient("127.0.0.1", lossy.sock.getsockname()[1])
    try:
        with pytest.raises(PullError) as err:
            client.pull(7, 0.1)
        assert err.value.kind == "timeout"
    finally:
        client.close()
        lossy.close()
    with pytest.raises(PullError) as err:
        BlockClient("127.0.0.1", port).pull(7, 0.5)  # the server is gone
    assert err.value.kind == "refused"


@pytest.mark.parametrize("text", ["-5,1", "10,0", "10,1e9", "1e12,1", "abc", "10", "nan,1"])
def test_bad_links_are_refused(text: str) -> None:
    with pytest.raises(ConfigError, match="link"):
        parse_link(text)


def test_link_model() -> None:
    link = LinkSpec(100, 10)
    assert link.seconds(125_000) == pytest.approx(100e-6 + 100e-6)
