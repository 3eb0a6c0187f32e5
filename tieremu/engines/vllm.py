"""A vLLM KV connector (KVConnectorBase_V1, loaded by module path) whose store is tieremu's tiers.

    --kv-transfer-config '{"kv_connector": "TieredKVConnector", "kv_connector_module_path": "tieremu.engines.vllm",
                           "kv_role": "kv_both", "kv_connector_extra_config": {"tiers": "configs/tiers/x.yaml",
                           "policy": "lru", "kv_tier": "dram"}}'

Scheduler side: a request's full prompt blocks are looked up by vLLM's block hashes (`Request.block_hashes`) in the
store, from the first block vLLM has not computed itself; the leading resident ones are promised to the scheduler
(and pinned in the store until loaded) and the prompt blocks the engine computes are queued for saving. Worker side:
promised blocks are read through tieremu's cache (each hit attributed to its tier, emulated tiers charged by their
timing model) into vLLM's paged KV tensor before the forward pass; after it, newly computed prompt blocks are copied
out of the paged tensor and admitted to the store where the policy says. Loads and saves are synchronous: the step
waits for them, so the time they take is in the engine's TTFT.

A peer source (`set_peer_source`, installed by tieremu.cluster's vLLM instances) extends the lookup across engines:
the blocks after the leading locally resident ones are asked of it (another engine's store, through the peer index
and the block transport), and those it returns are saved into this store before the scheduler is answered, so the
load path reads them like its own (the pull's time is in the request's TTFT).

Both sides live in vLLM's engine-core process (the scheduler and, with one worker, the model runner), so they share
one store per process, created by whichever side comes first (`shared_store`).

The connector also places vLLM's own KV tensor on a tier's node (`kv_tier`): through `get_mem_pool_context()`
around the allocation, then bound and verified page by page when the tensors are registered (tieremu.engines.kvplace).
When that tier is emulated (or shaped), its memory is host memory at host speed, so each layer's attention reads of
the KV tensor are charged the tier's timing model in the per-layer hook (`save_kv_layer`, which runs right after the
layer's attention): the bytes of KV the layer's attention reads (every scheduled request's context, K and V) at the
tier's bandwidth deficit plus its extra latency per block, and the bytes it writes (the step's new tokens) at its
write deficit, busy-waited there and then. That is a model of where the time would go, not a measurement, and the
result says so (`kv_placement.attention_reads`).

The figures (store counters, hits per tier, the KV tensor's placement) are the same in-process (the offline arm
reads them with `current()`) and in a server: there the connector lives in vLLM's engine-core process, so with
`stats_file` in kv_connector_extra_config it writes them there (whole, atomically) once its KV tensor is placed and
after every finished request, for the driver to read.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from tieremu.engines.kvplace import KVPlacement, bind_tensors, bound_to, require_placed, verify
from tieremu.engines.store import TierStore, capacities_for
from tieremu.engines.tiering import ResolvedStoreConfig, StoreConfig, open_tiers
from tieremu.errors import ConfigError, KVError
from tieremu.kv.layout import KVLayout

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

KEY_MASK = (1 << 63) - 1


def block_key(block_hash: object) -> int:
    """tieremu's block key for a vLLM block hash (bytes of a sha256, or an int in older releases)."""
    value = getattr(block_hash, "hash_value", block_hash)
    if isinstance(value, bytes | bytearray):
        return int.from_bytes(bytes(value[:8]), "little") & KEY_MASK
    if isinstance(value, int):
        return value & KEY_MASK
    raise KVError(f"vLLM block hash of type {type(value).__name__} is not understood (expected bytes or int)")


# -- the store shared by both sides in one process ---------------------------------------------------------------

ATTENTION_MODEL = ("modelled, not measured: the engine's KV tensor is in host memory, so each layer's attention "
                   "reads (every scheduled request's context, K and V) are charged the tier's bandwidth deficit plus "
                   "its extra latency per block, and its writes (the step's new tokens) the write deficit, "
                   "busy-waited after the layer (tieremu's DelayInjector)")


@dataclass
class Shared:
    store: TierStore
    resolved: ResolvedStoreConfig
    placement: KVPlacement | None = None
    finished_requests: int = 0  # requests the scheduler has let go of (the driver waits for all of its own)
    attention_layer_calls: int = 0  # layer forward passes whose attention reads were charged (emulated KV tier)

    def report(self) -> dict[str, object]:
        """What the driver reports of the connector: its store's counters, its tiers, the KV tensor's placement."""
        resolved = self.resolved
        with self.store.lock:
            connector: dict[str, object] = asdict(self.store.stats) | {"resident_by_tier": self.store.resident()}
        config = resolved.config
        connector |= {"block_tokens": self.store.layout.block_tokens, "policy": config.policy,
                      "tier_map": str(config.tiers), "kv_tier": config.kv_tier}
        if resolved.injector is not None:
            connector["injected_ms_by_tier"] = {name: audit.injected_ns / 1e6
                                                for name, audit in resolved.injector.audits.items()}
        placement = None
        if self.placement is not None:
            placement = self.placement.to_dict() | {"attention_reads": self._attention_reads()}
        tiers = resolved.tiers.tiers
        return {"connector": connector, "kv_placement": placement,
                "tiers": [{"name": t.name, "backing": t.label, "nodes": list(t.nodes)} for t in tiers],
                "origin": "emulated" if any(t.backing.origin == "emulated" for t in tiers) else "measured",
                "finished_requests": self.finished_requests}

    def _attention_reads(self) -> dict[str, object] | None:
        injector = self.resolved.kv_injector
        if injector is None:
            return None
        (audit,) = injector.audits.values()
        return {"model": ATTENTION_MODEL, "origin": "emulated", "tier": audit.tier,
                "layer_calls": self.attention_layer_calls, "charged_bytes": audit.charged_bytes,
                "charged_blocks": audit.charged_accesses, "owed_ms": audit.owed_ns / 1e6,
                "injected_ms": audit.injected_ns / 1e6}

    def write_stats(self, path: Path) -> None:
        """The report, whole, at path (written beside it and renamed: a reader never sees half of it)."""
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.report() | {"pid": os.getpid(), "written_unix": time.time()}))
        os.replace(tmp, path)


_shared: Shared | None = None
_roles_here: set[KVConnectorRole] = set()  # the connector roles created in this process
_shared_lock = threading.Lock()


def shared_store(config: StoreConfig, layout: KVLayout) -> Shared:
    global _shared
    with _shared_lock:
        if _shared is None:
            resolved = open_tiers(config)
            capacities = None
            if resolved.policy.lifts_capacity:
                # A bound (all-fastest, all-slowest): the tier it fills could hold every block of the map.
                total = sum(capacities_for(resolved.tiers, layout).values())
                capacities = {t.name: total for t in resolved.tiers.tiers}
            store = TierStore(resolved.tiers, layout, resolved.policy, injector=resolved.injector,
                              capacities=capacities)
            _shared = Shared(store, resolved)
        elif _shared.store.layout != layout:
            raise KVError(f"one process, two engines with different KV layouts: {_shared.store.layout.describe()} "
                          f"and {layout.describe()}")
        return _shared


class PeerSource(Protocol):
    """Where the connector asks for blocks its own store lacks: other engines' stores (tieremu.cluster's vLLM
    instances install one with `set_peer_source`; this layer knows nothing of indexes or links)."""

    def fetch(self, keys: Sequence[int], request_id: str) -> list[torch.Tensor]:
        """Blocks for the leading keys that peers hold, in order, stopping at the first one not obtained; each
        [layers, 2, block_tokens, kv_heads, head_dim] in the store's dtype, already checked end to end."""
        ...


_peer: PeerSource | None = None


def set_peer_source(source: PeerSource | None) -> None:
    """Install (or, with None, remove) this process's peer source: from then on, the prompt blocks after the
    leading locally resident ones are asked of it before the scheduler is told how many tokens it can load."""
    global _peer
    _peer = source


def current() -> Shared | None:
    """This process's store (and the KV tensor's placement), for the driver's report; None before any engine."""
    return _shared


def close_shared() -> None:
    global _shared
    with _shared_lock:
        if _shared is not None:
            _shared.store.close()
            _shared = None


def layout_of(vllm_config: VllmConfig) -> KVLayout:
    model = vllm_config.model_config
    dtype = model.dtype if isinstance(model.dtype, torch.dtype) else getattr(torch, str(model.dtype))
    return KVLayout(layers=model.get_num_layers(vllm_config.parallel_config),
                    kv_heads=model.get_num_kv_heads(vllm_config.parallel_config), head_dim=model.get_head_size(),
                    block_tokens=vllm_config.cache_config.block_size, dtype=dtype)


EXTRA_KEYS = ("tiers", "policy", "policy_params", "kv_tier", "capacities", "stats_file")


@dataclass(frozen=True)
class ConnectorOptions:
    store: StoreConfig
    stats_file: Path | None = None  # where the connector writes its figures (a server's driver reads them there)


def config_of(extra: Mapping[str, Any]) -> ConnectorOptions:
    unknown = sorted(set(extra) - set(EXTRA_KEYS))
    if unknown:
        raise ConfigError(f"kv_connector_extra_config: unknown key(s) {', '.join(unknown)}; valid: "
                          f"{', '.join(EXTRA_KEYS)}")
    if "tiers" not in extra:
        raise ConfigError("kv_connector_extra_config needs 'tiers': the path of a tieremu tier map")
    store = StoreConfig(tiers=Path(str(extra["tiers"])), policy=str(extra.get("policy", "lru")),
                        policy_params=dict(extra.get("policy_params") or {}),
                        kv_tier=None if extra.get("kv_tier") is None else str(extra["kv_tier"]))
    stats = extra.get("stats_file")
    return ConnectorOptions(store, None if stats is None else Path(str(stats)))


# -- what the scheduler tells the worker each step ---------------------------------------------------------------

@dataclass(frozen=True)
class LoadSpec:
    request: int
    block_ids: tuple[int, ...]
    keys: tuple[int, ...]


@dataclass(frozen=True)
class SaveSpec:
    request: int
    block_id: int
    key: int


@dataclass
class TieredMetadata(KVConnectorMetadata):
    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)


@dataclass
class _Tracked:
    """The scheduler side's view of one request."""

    index: int
    request: Request
    block_ids: list[int] = field(default_factory=list)
    handled: int = 0  # prompt blocks already loaded or queued for saving
    load_from: int = 0  # first block of a promised load
    load_keys: tuple[int, ...] = ()
    load_pending: bool = False


_LAYER_INDEX = re.compile(r"\.(\d+)\.")


class TieredKVConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole,
                 kv_cache_config: KVCacheConfig | None = None) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        if role == KVConnectorRole.SCHEDULER and KVConnectorRole.WORKER not in _roles_here:
            # vLLM builds the workers (and their connector) before the scheduler: a scheduler with no worker in its
            # process would look blocks up in a store that no save ever reaches.
            raise ConfigError("TieredKVConnector: vLLM's scheduler and its worker run in different processes, so "
                              "they cannot share tieremu's store; run the worker in the engine-core process "
                              "(on the CPU platform: VLLM_ENABLE_V1_MULTIPROCESSING=0, for the OpenAI server too)")
        _roles_here.add(role)
        self.options = config_of(self._kv_transfer_config.kv_connector_extra_config or {})
        self.config = self.options.store
        self.layout = layout_of(vllm_config)
        self.block_size = self.layout.block_tokens
        self.shared = shared_store(self.config, self.layout)
        self.store = self.shared.store
        self._tracked: dict[str, _Tracked] = {}
        self._next_index = 0
        self._kv: list[torch.Tensor] = []  # per layer, [blocks, 2, block_size, kv_heads * head_dim]
        self._token_bytes = 0  # K and V of one token in one layer of the engine's KV tensor

    # -- scheduler side ------------------------------------------------------------------------------------

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        tracked = self._track(request)
        # Only whole blocks before the last prompt token: vLLM must compute at least one token itself.
        limit = (len(request.prompt_token_ids or ()) - 1) // self.block_size
        first = num_computed_tokens // self.block_size
        keys = [block_key(h) for h in request.block_hashes[first:limit]]
        if tracked.load_keys:
            self.store.release(tracked.load_keys)  # asked again (not scheduled last time): promise afresh
        if _peer is not None:
            self._pull_from_peers(keys, tracked)
        found = self.store.matched(keys, tracked.index)
        tracked.load_from, tracked.load_keys = first, tuple(keys[:found])
        return found * self.block_size, False

    def _pull_from_peers(self, keys: list[int], tracked: _Tracked) -> None:
        """The blocks after the leading resident ones, if peers hold them: pulled now (the scheduler's step waits:
        the time is in the request's TTFT) and saved into this store, so the load path reads them like its own."""
        assert _peer is not None
        local = self.store.resident_prefix(keys)
        if local == len(keys):
            return
        for key, block in zip(keys[local:], _peer.fetch(keys[local:], tracked.request.request_id), strict=False):
            if self.store.save(key, block, tracked.index) is None and self.store.resident_prefix([key]) == 0:
                break  # no tier could take it: the blocks after it would not be a leading run either

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        tracked = self._track(request)
        if num_external_tokens <= 0:
            self.store.release(tracked.load_keys)
            tracked.load_keys = ()
            return
        if num_external_tokens != len(tracked.load_keys) * self.block_size:
            raise KVError(f"request {request.request_id}: vLLM allocated for {num_external_tokens} external tokens, "
                          f"the connector promised {len(tracked.load_keys) * self.block_size}")
        tracked.load_pending = True

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = TieredMetadata()
        for new in scheduler_output.scheduled_new_reqs:
            tracked = self._tracked.get(new.req_id)
            if tracked is None:
                continue
            tracked.block_ids = list(new.block_ids[0])
            tracked.handled = new.num_computed_tokens // self.block_size - len(tracked.load_keys) \
                if tracked.load_pending else new.num_computed_tokens // self.block_size
            self._plan(tracked, new.num_computed_tokens + scheduler_output.num_scheduled_tokens[new.req_id], meta)
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            tracked = self._tracked.get(req_id)
            if tracked is None:
                continue
            ids = cached.new_block_ids[i]
            if ids is not None:
                if req_id in cached.resumed_req_ids:
                    tracked.block_ids = list(ids[0])
                else:
                    tracked.block_ids.extend(ids[0])
            self._plan(tracked, cached.num_computed_tokens[i] + scheduler_output.num_scheduled_tokens[req_id], meta)
        return meta

    def _plan(self, tracked: _Tracked, computed_after: int, meta: TieredMetadata) -> None:
        """A promised load (once), then every prompt block this step completes, to be saved."""
        if tracked.load_pending:
            start, keys = tracked.load_from, tracked.load_keys
            meta.loads.append(LoadSpec(tracked.index, tuple(tracked.block_ids[start:start + len(keys)]), keys))
            tracked.load_pending = False
            tracked.handled = start + len(keys)
        request = tracked.request
        prompt = len(request.prompt_token_ids or ())
        full = min(computed_after, prompt) // self.block_size
        full = min(full, len(request.block_hashes), len(tracked.block_ids))
        for i in range(tracked.handled, full):
            meta.saves.append(SaveSpec(tracked.index, tracked.block_ids[i], block_key(request.block_hashes[i])))
        tracked.handled = max(tracked.handled, full)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        tracked = self._tracked.pop(request.request_id, None)
        if tracked is not None and tracked.load_pending:
            self.store.release(tracked.load_keys)
        self.shared.finished_requests += 1
        self._write_stats()
        return False, None

    def _write_stats(self) -> None:
        if self.options.stats_file is not None:
            self.shared.write_stats(self.options.stats_file)

    def _track(self, request: Request) -> _Tracked:
        tracked = self._tracked.get(request.request_id)
        if tracked is None:
            tracked = self._tracked[request.request_id] = _Tracked(self._next_index, request)
            self._next_index += 1
        return tracked

    # -- worker side ---------------------------------------------------------------------------------------

    def get_mem_pool_context(self) -> AbstractContextManager | None:
        target = self.shared.resolved.kv_node
        return None if target is None else bound_to(target)

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        ordered = sorted(kv_caches.items(), key=lambda item: _layer_index(item[0]))
        self._kv = [_block_view(name, t, self.layout) for name, t in ordered]
        if len(self._kv) != self.layout.layers:
            raise KVError(f"vLLM registered {len(self._kv)} KV layers, the model has {self.layout.layers}")
        resolved = self.shared.resolved
        tensors = [t for _, t in ordered]
        if resolved.kv_node is not None:
            bind_tensors(tensors, resolved.kv_node)
        self.shared.placement = verify(tensors, tier=resolved.config.kv_tier, backing=resolved.kv_backing,
                                       node=resolved.kv_node, note=resolved.kv_note,
                                       tier_nodes=resolved.kv_tier_nodes)
        self._token_bytes = 2 * self._kv[0].shape[-1] * self._kv[0].element_size()
        self._write_stats()  # the placement is known before any request: a driver can check it
        require_placed(self.shared.placement)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, TieredMetadata)
        bt = self.block_size
        for load in meta.loads:
            layers = self.store.load(load.keys, load.request)
            ids = torch.tensor(load.block_ids, dtype=torch.long)
            for kv, (k, v) in zip(self._kv, layers, strict=True):
                n = len(load.block_ids)
                kv[ids, 0] = k.reshape(n, bt, -1).to(kv.dtype)
                kv[ids, 1] = v.reshape(n, bt, -1).to(kv.dtype)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # start_load_kv loaded every layer before the forward pass

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: AttentionMetadata,
                      **kwargs: Any) -> None:
        # Blocks are saved whole (all layers) in wait_for_save, once the forward pass has written every layer. This
        # hook runs right after the layer's attention: where an emulated KV tier's reads are charged.
        injector = self.shared.resolved.kv_injector
        if injector is None:
            return
        seq_lens = getattr(attn_metadata, "seq_lens", None)
        new_tokens = getattr(attn_metadata, "num_actual_tokens", None)
        if seq_lens is None or new_tokens is None:
            raise KVError(f"--kv-tier {self.config.kv_tier}: vLLM's attention metadata "
                          f"({type(attn_metadata).__name__}) has no seq_lens / num_actual_tokens, so the attention "
                          "reads of the emulated tier cannot be charged")
        lens = [int(n) for n in seq_lens.tolist()]
        starts = getattr(attn_metadata, "query_start_loc", None)
        if starts is not None:
            lens = lens[:len(starts) - 1]  # one per scheduled request (nothing a padded batch may add)
        tier = next(iter(injector.models))
        bs = self.block_size
        injector.read(tier, sum(-(-n // bs) for n in lens), sum(lens) * self._token_bytes)
        injector.transfer(tier, int(new_tokens) * self._token_bytes, "write")
        injector.settle()
        self.shared.attention_layer_calls += 1

    def wait_for_save(self) -> None:
        if not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        assert isinstance(meta, TieredMetadata)
        shape = (self.layout.layers, 2, self.block_size, self.layout.kv_heads, self.layout.head_dim)
        for save in meta.saves:
            block = torch.stack([kv[save.block_id] for kv in self._kv]).reshape(shape)
            self.store.save(save.key, block, save.request)
        self.store.epoch()


def _layer_index(name: str) -> int:
    found = _LAYER_INDEX.search(name)
    if found is None:
        raise KVError(f"vLLM KV layer name {name!r} has no layer number")
    return int(found.group(1))


def _block_view(name: str, tensor: torch.Tensor, layout: KVLayout) -> torch.Tensor:
    """A view [blocks, 2 (K, V), block_size, kv_heads * head_dim] of one layer's paged KV tensor."""
    width = layout.kv_heads * layout.head_dim
    if tensor.dim() >= 3 and tensor.shape[1] == 2 and tensor.shape[2] == layout.block_tokens:
        return tensor.reshape(tensor.shape[0], 2, layout.block_tokens, width)
    if tensor.dim() >= 3 and tensor.shape[0] == 2 and tensor.shape[2] == layout.block_tokens:
        return tensor.reshape(2, tensor.shape[1], layout.block_tokens, width).transpose(0, 1)
    raise KVError(f"vLLM KV tensor {name} has shape {tuple(tensor.shape)}; expected [blocks, 2, "
                  f"{layout.block_tokens}, ...] or [2, blocks, {layout.block_tokens}, ...]")
