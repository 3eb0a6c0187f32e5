"""The Mooncake transport: a pull whose payload moves by the Transfer Engine, checksummed end to end (a corrupted
block refused, a restarted holder's engine found again); 3 instances pulling through it in a real replay, on loopback
and (as root) in network namespaces, no process or namespace left; the missing package refused before any work.

The tests that need the package skip when it is not installed (`bash scripts/setup-mooncake.sh`), except under
CI=true, where .ci/run installs it: there they fail instead."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner
from cluster_helpers import children, reuse_trace

from tieremu.cli.root import main as cli_main
from tieremu.cluster import mooncake, netns
from tieremu.cluster.link import LinkSpec
from tieremu.cluster.replay import ClusterSpec, check
from tieremu.cluster.wire import BlockClient, BlockServer, LinkState, PullError
from tieremu.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
TIERS = ROOT / "configs" / "tiers" / "cluster-peer.yaml"
MISSING = mooncake.available()
needs_mooncake = pytest.mark.skipif(
    MISSING is not None and os.environ.get("CI") != "true",
    reason=f"{mooncake.PACKAGE} is not installed ({MISSING}); `bash {mooncake.SETUP}` installs it")


@needs_mooncake
def test_a_pull_moves_by_the_transfer_engine_and_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    block = bytes(range(256)) * 78  # 19,968 bytes: not a whole number of pages
    state = LinkState(LinkSpec(10, 1), pace=True)
    servers: list[BlockServer] = []
    stages: list[mooncake.MooncakeStage] = []
    clients: list[BlockClient] = []
    try:
        # Two instances in one process: 0 holds the block, 1 pulls it. Each asks the other's block port for its
        # engine address, so the servers' ports come first.
        for me in range(2):
            servers.append(BlockServer("127.0.0.1", 0, lambda _k: None, lambda _h: state, me=me))
        ports = [s.sock.getsockname()[1] for s in servers]
        for me in range(2):
            stages.append(mooncake.MooncakeStage(mooncake.StageSpec(2, len(block), {1 - me: "127.0.0.1"},
                                                                    {1 - me: ("127.0.0.1", ports[1 - me])}), me))
        for me, server in enumerate(servers):
            server.pool = stages[me]
            stage = stages[me]
            server.read = lambda key, stage=stage: stage.describe() if key == mooncake.DESCRIBE_KEY else (
                block if key == 5 else None)
        clients.append(BlockClient("127.0.0.1", ports[0], stages[1], me=1, holder=0))
        client = clients[0]
        got = client.pull(5, 2.0)
        assert got.payload == block
        slot = stages[1].spec.slot_bytes
        receive = bytes(stages[1].view[2 * slot:2 * slot + len(block)])  # instance 1's receive slot for holder 0
        assert receive == block  # the engine read it from the holder's registered staging slot into ours
        assert bytes(stages[0].view[slot:slot + len(block)]) == block  # staged in holder 0's slot for puller 1
        assert got.seconds >= LinkSpec(10, 1).seconds(len(block)) * 0.9  # the transport paced the holder's copy
        assert client.pull(6, 1.0).payload is None  # not held: no transfer
        # A byte flipped on its way into the staging slot, after the holder's checksum: refused, never returned.
        real = stages[0].write

        def flipped(holder: int, puller: int, token: int, offset: int, data: memoryview) -> bool:
            if offset == 0:
                data = memoryview(bytes([data[0] ^ 1]) + bytes(data[1:]))
            return real(holder, puller, token, offset, data)
        monkeypatch.setattr(stages[0], "write", flipped)
        with pytest.raises(PullError) as err:
            client.pull(5, 2.0)
        assert err.value.kind == "corrupt"
        monkeypatch.undo()
        # A pull the puller gave up on stops writing once a newer pull claims the slot.
        old, new = stages[0].claim(0, 1, 7), stages[0].claim(0, 1, 8)
        assert not stages[0].write(0, 1, old, 0, memoryview(b"stale"))
        assert stages[0].write(0, 1, new, 0, memoryview(b"fresh")) and bytes(stages[1].slot_view(0, 1, 5)) == b"fresh"
        # The holder restarts with a new engine (a new handshake port, a new buffer): the puller's read from the old
        # one fails, it asks again where the engine is and reads from the new one.
        stages[0].close()
        stages[0] = mooncake.MooncakeStage(stages[0].spec, 0)
        servers[0].pool = stages[0]
        servers[0].read = lambda key: stages[0].describe() if key == mooncake.DESCRIBE_KEY else block
        assert client.pull(5, 2.0).payload == block
        assert stages[1]._peers[0] == (f"127.0.0.1:{stages[0].ports['127.0.0.1']}", stages[0].addr)
    finally:
        for c in clients:
            c.close()
        for s in servers:
            s.close()
        for st in stages:
            st.close()


@needs_mooncake
@pytest.mark.parametrize("namespaces", [
    False,
    pytest.param(True, marks=pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")),
])
def test_three_instances_pull_through_mooncake_and_leave_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 namespaces: bool, meshes_made: list[str]) -> None:
    monkeypatch.setenv(netns.STATE_ENV, str(tmp_path / "state"))
    trace = reuse_trace(tmp_path / "reuse.jsonl")
    before = children(os.getpid())
    out = CliRunner().invoke(cli_main, ["cluster", "replay", str(trace), "--tiers", str(TIERS), "--instances", "3",
                                        "--transport", "mooncake", "--pull", "always",
                                        "--namespaces" if namespaces else "--no-namespaces",
                                        "--time-scale", "0.25", "--block-kib", "16", "--link", "10,10", "--json"])
    assert out.exit_code == 0, out.output
    doc = json.loads(out.output[out.output.index("{"):])
    assert doc["transport"] == "mooncake" and doc["namespaces"] == namespaces and doc["completed"] == 9
    # 2 of each group's 3 requests find its 8 prefix blocks on a peer: 48 of 81 block references (allow a lookup
    # that found nothing on a loaded machine).
    assert doc["hit_ratio"]["peer"] > 0 and 40 <= round(doc["hit_ratio"]["peer"] * 81) <= 48, doc
    assert doc["corrupted_blocks"] == 0 and doc["pulls_failed"] == 0
    assert doc["peer_bytes"] == sum(r["pulls"] for r in doc["instances"]) * 16 * 1024
    # In namespaces Mooncake's own TCP crosses the tbf-shaped veths (one engine per link address); on loopback the
    # transport paces the holder's copy.
    medium, rate = ("veth", "kernel-tbf") if namespaces else ("loopback", "transport-pacing")
    assert doc["shaping"]["medium"] == f"mooncake-transfer-engine-tcp-{medium}"
    assert doc["shaping"]["rate"] == rate and doc["origin"] == "emulated"
    assert any("Transfer Engine" in n for n in doc["notes"])
    assert children(os.getpid()) <= before  # every instance process is gone
    # and every namespace it made is gone
    assert len(meshes_made) == (3 if namespaces else 0) and not set(meshes_made) & set(netns.list_namespaces())


def test_a_missing_package_is_refused_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trace = reuse_trace(tmp_path / "reuse.jsonl")
    before = children(os.getpid())
    monkeypatch.setattr(mooncake, "available", lambda: "No module named 'mooncake'")
    with pytest.raises(ConfigError, match=r"needs the mooncake-transfer-engine-non-cuda package .*"
                                          r"bash scripts/setup-mooncake.sh"):
        check(ClusterSpec(trace=trace, tiers=TIERS, transport="mooncake", link=LinkSpec(10, 10)))
    out = CliRunner().invoke(cli_main, ["cluster", "replay", str(trace), "--tiers", str(TIERS),
                                        "--transport", "mooncake", "--link", "10,10", "--no-namespaces"])
    assert out.exit_code != 0 and "scripts/setup-mooncake.sh" in out.output
    assert children(os.getpid()) <= before
