"""The exception hierarchy: every error a user can hit names what was wrong and what would be valid."""

from __future__ import annotations


class TieremuError(Exception):
    """Base of every error tieremu raises on purpose; the CLI prints these without a traceback."""


class ConfigError(TieremuError):
    """A config file (tier map, experiment, profile, topology) has a bad key or value."""


class TopologyError(TieremuError):
    """The sysfs tree could not be read or a required file is malformed."""


class NumaError(TieremuError):
    """A NUMA system call failed.

    Carries the call name, the nodes involved and the errno so callers can react; the message
    says in words why it failed and what would work.
    """

    def __init__(self, message: str, *, call: str, errno: int = 0, nodes: tuple[int, ...] = ()) -> None:
        super().__init__(message)
        self.call = call
        self.errno = errno
        self.nodes = nodes


class InvalidNodeError(NumaError):
    """A node was named that does not exist or has no memory."""


class CapabilityError(NumaError):
    """The kernel refused for lack of a capability (usually CAP_SYS_NICE)."""


class NodeFullError(NumaError):
    """A node has too little free memory for the request."""


class PlacementError(TieremuError):
    """Pages did not land where they were asked to, or a region is in a state that forbids the request."""


class ResolutionError(TieremuError):
    """A tier map cannot be resolved against this machine's topology."""


class ProbeError(TieremuError):
    """A characterization probe cannot run here (missing tool, bad directory, compiler failure)."""
