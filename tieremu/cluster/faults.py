"""`--fault KIND@N`: a fault that strikes when the cluster's N-th request (0-based, trace order) is dispatched.

- kill-peer: the victim is armed, then dies (SIGKILL, by its own hand) in the middle of the next pull it serves: it
  has taken the request and read the block, and the reply never comes; the puller sees the connection die. If no
  pull reaches it within KILL_WAIT_S, the orchestrator kills it anyway (the result's notes say which).
- restart-peer: the victim is killed and started again (same addresses, a new incarnation, an empty cache).
- drop-events: the victim's next DROPPED_EVENTS index events are numbered and never sent.
- reorder-events: the victim's next index event (REORDERED_EVENTS) is held back and sent right after the event that
  follows it on its stream, however late that is. Receivers apply events in number order (a reorder
  buffer); a held event whose successor is long in coming shows as a gap in the heartbeats, is healed by a snapshot,
  and is ignored when it finally arrives (its turn has passed): a late 'stored' never undoes a later 'evicted'.
- partition: the link between instance 0 and the victim loses everything (100% loss) from then on.
"""

from __future__ import annotations

from dataclasses import dataclass

from tieremu.errors import ConfigError

FAULT_KINDS = ("kill-peer", "restart-peer", "drop-events", "reorder-events", "partition")
DROPPED_EVENTS = 5  # drop-events: how many consecutive events the victim fails to deliver
# reorder-events: how many events the victim sends late, each after its successor. One: a later held event would
# end in a gap that a snapshot heals, hiding what a receiver did with the first.
REORDERED_EVENTS = 1
KILL_WAIT_S = 3.0  # kill-peer: how long (wall) the armed victim waits for a pull to die in before it is killed


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
