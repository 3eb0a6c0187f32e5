"""One vLLM serving instance of a cluster, as its own process (`python -m tieremu.cluster.vllm_instance`): vLLM's
CPU build in process (offline `LLM`, scheduler and worker in this process, as tieremu.engines.arm runs it) with
tieremu's tiered KV connector, and that connector's peer source: blocks its own store lacks are looked up in the
peer index (tieremu.cluster.index, a library here) and pulled from the instance that holds them over the block
transport (tieremu.cluster.wire, checksummed end to end), then saved into the local store, from which the
connector loads them into vLLM's paged KV tensor instead of vLLM prefilling them.

The orchestrator (tieremu.cluster.vllm_replay, reusing tieremu.cluster.replay's process handling) speaks the same
JSON lines as with tieremu's own instances: one line of settings, then `start`, requests and `end` on stdin; ready,
one `done` per request, drained and result on stdout. A request is added to the engine when it is due (its
time-scaled arrival) and the engine is stepped between arrivals (continuous batching); after every step the
store's changes (stored and evicted blocks) are published to the index.

Per request: local = prompt blocks the connector loaded from this instance's own store, peer = those pulled from
a peer (and loaded), miss = prompt blocks vLLM computed itself (of the whole blocks before the prompt's last
token: vLLM always computes at least one token).
"""

from __future__ import annotations

import heapq
import json
import os
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from tieremu.cluster.index import Endpoints, IndexStats, PeerIndex
from tieremu.cluster.instance import Inbox, Output
from tieremu.cluster.link import LinkSpec
from tieremu.cluster.wire import BlockClient, BlockServer, LinkState, PullError
from tieremu.engines.prompts import build_prompts
from tieremu.engines.store import TierStore
from tieremu.errors import KVError
from tieremu.workloads.trace import Request

PULL_TIMEOUT_S = 2.0  # beyond the link's time: the holder answers from a thread that shares its CPU with an engine


class ProtocolOut(Output):
    """JSON lines to the orchestrator on a stream of their own."""

    def __init__(self, stream: Any) -> None:
        super().__init__()
        self.stream = stream

    def send(self, **msg: Any) -> None:
        with self._lock:
            self.stream.write(json.dumps(msg) + "\n")
            self.stream.flush()


@dataclass
class PeerCounters:
    pulls: int = 0
    pulls_failed: int = 0
    stale: int = 0
    corrupted: int = 0
    peer_bytes: int = 0
    pull_ms: list[float] = field(default_factory=list)
    pulled_by_request: dict[str, int] = field(default_factory=dict)


def external_id(request_id: str) -> str:
    """The id the instance gave a request (vLLM's scheduler appends '-' and 8 characters of its own)."""
    return request_id.rsplit("-", 1)[0]


class PeerHook:
    """The connector's peer source (tieremu.engines.vllm.PeerSource), serving this store's blocks to peers and
    telling the index what it holds."""

    def __init__(self, settings: dict[str, Any], store: TierStore) -> None:
        self.s = settings
        self.store = store
        self.me = settings["me"]
        self.c = PeerCounters()
        self.link = LinkSpec(**settings["link"])
        self.links = {host: LinkState(self.link, pace=settings["pace"]) for host in settings["peer_hosts"]}
        self.lock = threading.Lock()
        self.published: set[int] = set()
        peers = {int(j): Endpoints(p["host"], p["events"], p["queries"]) for j, p in settings["peers"].items()}
        mine = settings["mine"]
        self.server = BlockServer(settings["bind"], mine["blocks"], store.peek, self._link_for, seed=self.me)
        self.index = PeerIndex(settings["index"], self.me, settings["incarnation"], peers, settings["bind"],
                               Endpoints(settings["bind"], mine["events"], mine["queries"]), store.held,
                               self.server.queue_s, lease_s=settings["lease_s"])
        self.clients = {int(j): BlockClient(p["host"], p["blocks"]) for j, p in settings["peers"].items()}
        layout = store.layout
        self.shape, self.dtype, self.nbytes = layout.block_shape, layout.dtype, layout.block_bytes

    def _link_for(self, host: str) -> LinkState:
        return self.links.get(host) or LinkState(self.link, pace=self.s["pace"])

    def fetch(self, keys: Sequence[int], request_id: str) -> list[torch.Tensor]:
        holders = self.index.lookup(keys)
        got: list[torch.Tensor] = []
        for key in keys:
            peers = holders.get(key)
            if not peers:
                break
            peer = min(peers, key=self.index.queue_of)
            try:
                reply = self.clients[peer].pull(key, self.link.seconds(self.nbytes) + PULL_TIMEOUT_S)
            except PullError as exc:
                if exc.kind == "corrupt":
                    self.c.corrupted += 1
                elif exc.kind == "refused":
                    self.c.stale += 1
                else:
                    self.c.pulls_failed += 1
                break
            if reply.payload is None:
                self.c.stale += 1  # the index named a holder that no longer holds it
                break
            if len(reply.payload) != self.nbytes:
                self.c.corrupted += 1  # a block of another layout: never stored
                break
            self.c.pulls += 1
            self.c.peer_bytes += len(reply.payload)
            self.c.pull_ms.append(reply.seconds * 1e3)
            got.append(torch.frombuffer(bytearray(reply.payload), dtype=self.dtype).view(self.shape))
        ext = external_id(request_id)
        self.c.pulled_by_request[ext] = self.c.pulled_by_request.get(ext, 0) + len(got)
        return got

    def publish(self) -> None:
        """Tell the index what the store gained and lost since the last call."""
        held = self.store.held()
        self.index.publish("evicted", sorted(self.published - held))
        self.index.publish("stored", sorted(held - self.published))
        self.published = held

    def close(self) -> None:
        self.index.close()
        self.server.close()
        for client in self.clients.values():
            client.close()


@dataclass
class Served:
    """One request on this instance."""

    index: int
    due: float  # wall time
    considered_blocks: int  # whole prompt blocks before the last prompt token (the connector's candidates)
    first_token: float | None = None
    cached_tokens: int = 0
    output: list[int] = field(default_factory=list)


def _build_engine(settings: dict[str, Any]) -> Any:
    from vllm import LLM
    from vllm.config import KVTransferConfig

    kv_transfer = KVTransferConfig(kv_connector="TieredKVConnector", kv_connector_module_path="tieremu.engines.vllm",
                                   kv_role="kv_both", kv_connector_extra_config=settings["connector"])
    return LLM(model=settings["model"], dtype=settings["dtype"], max_model_len=settings["max_model_len"],
               enforce_eager=True, skip_tokenizer_init=True, enable_prefix_caching=False,
               block_size=settings["block_tokens"], kv_transfer_config=kv_transfer, seed=0)


def _due_now(inbox: Inbox, due_of: Any) -> list[tuple[int, Request, float]]:
    """Every queued request whose time has come (none waits)."""
    out = []
    with inbox.cond:
        while inbox.heap and (due := due_of(inbox.heap[0][0])) <= time.time():
            _, i, r = heapq.heappop(inbox.heap)
            out.append((i, r, due))
    return out


def main() -> None:
    from tieremu.engines.procs import die_with_parent

    die_with_parent()  # killed with the orchestrator even if it is killed outright
    # The protocol keeps the real stdout; everything else written to fd 1 (vLLM logs to stdout) goes to the log.
    out = ProtocolOut(os.fdopen(os.dup(1), "w"))
    os.dup2(2, 1)
    try:
        serve(out, json.loads(sys.stdin.readline()))
    except Exception as exc:  # the orchestrator quotes this line (and the log's last lines) in its error
        import traceback

        traceback.print_exc()
        print(f"tieremu-engine-error: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        os._exit(1)
    out.stream.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # vLLM's teardown of an in-process engine adds seconds and nothing the result needs


def serve(out: ProtocolOut, settings: dict[str, Any]) -> None:
    """Build the engine, say ready, serve what arrives until the end, report."""
    from tieremu.engines import vllm as connector

    t0 = time.monotonic()
    llm = _build_engine(settings)
    construct_s = time.monotonic() - t0
    shared = connector.current()
    if shared is None:
        raise KVError("vLLM built the engine without tieremu's connector")
    store = shared.store
    hook = PeerHook(settings, store) if settings["sharing"] == "p2p" else None
    connector.set_peer_source(hook)
    out.send(ev="ready", me=settings["me"], construct_s=construct_s)
    start = json.loads(sys.stdin.readline())
    inbox = Inbox([])

    def due_of(arrival: float) -> float:
        return start["t0_wall"] + (arrival - start["trace0_s"]) * settings["time_scale"]

    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    engine = llm.llm_engine
    bt, vocab, cap = settings["block_tokens"], settings["vocab_size"], settings["max_output_tokens"]
    served: dict[str, Served] = {}
    finished: list[Served] = []
    try:
        while True:
            for i, request, due in _due_now(inbox, due_of):
                (prompt,) = build_prompts([request], bt, vocab)
                tokens = list(prompt.token_ids)
                ext = f"r{i}"
                served[ext] = Served(i, due, (len(tokens) - 1) // bt)
                params = SamplingParams(temperature=0.0, max_tokens=prompt.output_tokens if cap is None
                                        else min(cap, prompt.output_tokens), ignore_eos=True, detokenize=False)
                engine.add_request(ext, TokensPrompt(prompt_token_ids=tokens), params, arrival_time=time.time())
            if engine.has_unfinished_requests():
                for o in engine.step():
                    s = served[o.request_id]
                    if s.first_token is None and o.outputs and o.outputs[0].token_ids:
                        s.first_token = time.time()
                        s.cached_tokens = o.num_cached_tokens or 0
                    if o.finished:
                        s.output = list(o.outputs[0].token_ids)
                        finished.append(served.pop(o.request_id))
                        assert s.first_token is not None
                        out.send(ev="done", i=s.index, ttft_ms=(s.first_token - s.due) * 1e3)
                if hook is not None:
                    hook.publish()
                continue
            if hook is not None:
                hook.publish()  # the policy's epochs may have evicted blocks
            with inbox.cond:
                if inbox.ended and not inbox.heap:
                    break
                wait = 0.05 if not inbox.heap else max(0.0, min(0.05, due_of(inbox.heap[0][0]) - time.time()))
                inbox.cond.wait(wait)
        out.send(ev="drained")
        inbox.report.wait()
        backings = {t.name: t.backing.value for t in shared.resolved.tiers.tiers}
        _report(out, settings, hook, store, finished, construct_s, shared.report(), backings)
    finally:
        connector.set_peer_source(None)
        if hook is not None:
            hook.close()


def _report(out: Output, settings: dict[str, Any], hook: PeerHook | None, store: TierStore, finished: list[Served],
            construct_s: float, connector_report: dict[str, object], backings: dict[str, str]) -> None:
    bt = settings["block_tokens"]
    local = peer = miss = 0
    rows = []
    for s in sorted(finished, key=lambda s: s.index):
        cached_blocks = s.cached_tokens // bt
        pulled = hook.c.pulled_by_request.get(f"r{s.index}", 0) if hook is not None else 0
        used = min(pulled, cached_blocks)
        local += cached_blocks - used
        peer += used
        miss += max(0, s.considered_blocks - cached_blocks)
        rows.append({"i": s.index, "cached_tokens": s.cached_tokens, "peer_blocks": used, "output": s.output})
    c = hook.c if hook is not None else PeerCounters()
    stats = hook.index.stats if hook is not None else None
    out.send(ev="result", me=settings["me"], requests=len(finished), local=local, peer=peer, miss=miss,
             peer_bytes=c.peer_bytes, served_bytes=hook.server.served_bytes if hook is not None else 0,
             pulls=c.pulls, pulls_failed=c.pulls_failed, stale=c.stale, corrupted=c.corrupted, blocks_checked=0,
             **IndexStats.reported(stats), pull_ms=c.pull_ms, estimates=[],
             decisions={"pull": sum(1 for n in c.pulled_by_request.values() if n), "recompute": 0},
             entries={str(k): v for k, v in (hook.index.entries() if hook is not None else {}).items()},
             held=sorted(store.held()), backings=backings, incarnation=settings["incarnation"],
             construct_s=construct_s, per_request=rows, connector=connector_report["connector"],
             origin_store=connector_report["origin"])


if __name__ == "__main__":
    main()
