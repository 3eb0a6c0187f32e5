"""The compiled replay core makes the Python path's decisions exactly: every figure of every built-in demand cache,
on the shared trace, with two and three tiers, pinned or not, with a migration budget or without."""

from __future__ import annotations

import pytest
from fixture_paths import MOONCAKE_TRACE

from tieremu.errors import ConfigError
from tieremu.policy import Policy, get_policy
from tieremu.policy.recency import LRU
from tieremu.workloads.replay_core import NATIVE, supports
from tieremu.workloads.simulate import ReplayResult, SimTier, policy_context, simulate
from tieremu.workloads.trace import Request, read_trace

TIMES = ("wall_s", "prepare_s", "policy_cpu_s", "core")  # how long and where it ran: the only fields that differ


@pytest.fixture(scope="module")
def requests() -> list[Request]:
    return read_trace(MOONCAKE_TRACE)


def figures(result: ReplayResult) -> dict[str, object]:
    data = result.to_dict(samples=True)
    for key in TIMES:
        data.pop(key, None)
    return data


def both(requests: list[Request], name: str, tiers: list[SimTier], **kwargs: object) -> tuple[ReplayResult, ...]:
    return tuple(simulate(requests, tiers, get_policy(name, {}, policy_context(requests)), core=core,
                          tier_read_gbps={tiers[0].name: 20.0}, **kwargs)  # type: ignore[arg-type]
                 for core in ("python", "native"))


@pytest.mark.parametrize("fast", [439, 4392])  # 1% and 10% of the distinct blocks (at 1%, requests fill it)
@pytest.mark.parametrize("name", NATIVE)
def test_two_tiers_pinned(requests: list[Request], name: str, fast: int) -> None:
    python, native = both(requests, name, [SimTier("fast", fast), SimTier("slow")])
    assert (python.core, native.core) == ("python", "native")
    assert figures(native) == figures(python)
    assert python.promotions > 0 and python.demotions > 0 and python.waited_requests > 0  # not vacuous


@pytest.mark.parametrize("name", NATIVE)
def test_three_limited_tiers_unpinned_under_a_budget(requests: list[Request], name: str) -> None:
    tiers = [SimTier("fast", 300), SimTier("mid", 1200), SimTier("far", 5000)]
    python, native = both(requests, name, tiers, pin=False, budget_gbps=4.0, epoch_s=0.001)
    assert figures(native) == figures(python)
    assert python.evictions > 0 and python.ping_pongs > 0 and python.migration_gbps <= 4.0


def test_only_the_exact_built_in_classes_run_natively() -> None:
    class Mine(LRU):
        name = "mine"

    assert supports(get_policy("lru")) and not supports(Mine()) and not supports(get_policy("hotcold"))
    policy: Policy = get_policy("hotcold")
    with pytest.raises(ConfigError, match="core=native runs the built-in demand caches"):
        simulate([Request(0, 512, 1, (1,))], [SimTier("a")], policy, core="native")
