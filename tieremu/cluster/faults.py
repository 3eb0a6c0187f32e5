"""`--fault KIND@N`: a fault that strikes when the cluster's N-th request (0-based, trace order) is dispatched."""

from __future__ import annotations

from dataclasses import dataclass

from tieremu.errors import ConfigError

FAULT_KINDS = ("kill-peer", "restart-peer", "drop-events", "partition")
DROPPED_EVENTS = 5  # drop-events: how many consecutive events the victim fails to deliver


@dataclass(frozen=True)
class Fault:
    kind: str
    at: int  # request index
    victim: int = 1  # the instance it hits (partition: the link between instance 0 and the victim)

    def label(self) -> str:
        return f"{self.kind}@{self.at}"


def parse_fault(text: str, instances: int, requests: int) -> Fault:
    kind, sep, at = str(text).partition("@")
    if not sep or kind not in FAULT_KINDS:
        raise ConfigError(f"--fault {text!r}: give KIND@N with KIND one of {', '.join(FAULT_KINDS)} and N a "
                          "request index, e.g. kill-peer@100")
    try:
        index = int(at)
    except ValueError:
        raise ConfigError(f"--fault {text!r}: N must be a whole request index, e.g. {kind}@100") from None
    if not 0 <= index < requests:
        raise ConfigError(f"--fault {text!r}: N={index} must be in 0..{requests - 1} (the run has {requests} "
                          "requests)")
    if instances < 2:
        raise ConfigError(f"--fault {text!r}: faults need at least 2 instances (got {instances})")
    return Fault(kind, index, victim=1)
