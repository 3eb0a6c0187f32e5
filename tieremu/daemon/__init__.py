"""The migration daemon: a policy's plans carried out on a live KV cache, epoch by epoch (daemon.py), through a
view of the cache that policies read (view.py) and an executor that survives what kernels do (executor.py).

Names are imported on first use, so that `tieremu.daemon.attach` (another process's pages, no KV cache) does not
pull in torch through the cache.
"""

from __future__ import annotations

import importlib

_WHERE = {
    "DaemonReport": "daemon", "LayerAware": "daemon", "MigrationDaemon": "daemon",
    "PlanOutcome": "executor", "execute_plan": "executor", "PoolView": "view",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> object:
    if name not in _WHERE:
        raise AttributeError(f"module 'tieremu.daemon' has no attribute {name!r}")
    return getattr(importlib.import_module(f"tieremu.daemon.{_WHERE[name]}"), name)
