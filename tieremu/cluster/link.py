"""A link between two instances as the user sets it: latency, bandwidth, jitter, loss; and who shapes what.

`--link LATENCY_US,GBPS` or a peer tier's `link: {latency_us, gbps, jitter_us, loss}`. Rate is shaped in the
kernel where it can be (tbf on each veth end, between network namespaces); this kernel has no netem, so delay,
jitter and loss are always applied by the transport itself, per message, and the transport paces the bytes when
the kernel does not (loopback). `Shaping` records which mechanism shaped each property.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from tieremu.errors import ConfigError

MAX_LATENCY_US = 1e6  # a second: past any datacenter or WAN link
MIN_GBPS = 0.001  # 1 Mb/s: below it a 64 KiB block takes over half a second
MAX_GBPS = 400.0  # the fastest NICs shipping


@dataclass(frozen=True)
class LinkSpec:
    latency_us: float  # one way, paid once per message (a pull's reply)
    gbps: float  # gigabits per second
    jitter_us: float = 0.0  # uniform extra delay in [0, jitter_us]
    loss: float = 0.0  # probability that a message is dropped (1.0: a partition)

    def __post_init__(self) -> None:
        problems = []
        if not 0 <= self.latency_us <= MAX_LATENCY_US:
            problems.append(f"latency_us={self.latency_us:g} must be in 0..{MAX_LATENCY_US:g}")
        if not MIN_GBPS <= self.gbps <= MAX_GBPS:
            problems.append(f"gbps={self.gbps:g} must be in {MIN_GBPS:g}..{MAX_GBPS:g} (gigabits per second)")
        if not 0 <= self.jitter_us <= MAX_LATENCY_US:
            problems.append(f"jitter_us={self.jitter_us:g} must be in 0..{MAX_LATENCY_US:g}")
        if not 0 <= self.loss <= 1:
            problems.append(f"loss={self.loss:g} must be a probability in 0..1")
        if problems:
            raise ConfigError("link: " + "; ".join(problems))

    def seconds(self, nbytes: int) -> float:
        """What the link alone should take for one message of nbytes: latency + bytes / bandwidth."""
        return self.latency_us * 1e-6 + nbytes * 8 / (self.gbps * 1e9)

    def to_json(self) -> dict[str, float]:
        return asdict(self)


def parse_link(text: str) -> LinkSpec:
    """'LATENCY_US,GBPS' (e.g. '10,1'); ConfigError naming the value otherwise."""
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) != 2:
        raise ConfigError(f"--link {text!r}: give LATENCY_US,GBPS, e.g. 10,1 (10 us one way, 1 Gb/s)")
    try:
        latency, gbps = float(parts[0]), float(parts[1])
    except ValueError:
        raise ConfigError(f"--link {text!r}: LATENCY_US and GBPS must be numbers, e.g. 10,1") from None
    return LinkSpec(latency, gbps)


@dataclass(frozen=True)
class Shaping:
    """Which mechanism shaped each property of one link."""

    rate: str  # "kernel-tbf" or "transport-pacing"
    delay: str = "transport"
    jitter: str = "transport"
    loss: str = "transport"

    def to_json(self) -> dict[str, str]:
        return asdict(self)
