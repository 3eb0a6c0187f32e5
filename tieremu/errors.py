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


class LabError(TieremuError):
    """A lab profile cannot be planned, applied, checked or torn down; the message says which knob and why."""


class LabNotRootError(LabError):
    """Changing kernel knobs needs root; raised before anything is written."""


class LabUnsupportedError(LabError):
    """A required action of a profile is not supported on this machine; raised before anything is written."""


class LabWriteError(LabError):
    """The kernel refused a write (or mkdir, rmdir, swapoff, swapon) of a lab knob."""

    def __init__(self, message: str, *, path: str, errno: int = 0) -> None:
        super().__init__(message)
        self.path = path
        self.errno = errno


class LabStateError(LabError):
    """The journal of applied profiles is missing, busy, unreadable, or belongs to another root."""


class KVError(TieremuError):
    """A KV-cache request cannot be met: unknown sequence or block, a layout that does not fit, a full pool."""


class PolicyError(ConfigError):
    """A policy name or parameter is unknown or invalid; the message lists the valid choices."""


class TraceError(ConfigError):
    """A request trace cannot be read: a bad line, a missing field, or a value out of range."""


class WorkloadError(TieremuError):
    """A workload cannot run as configured (bad preset, model shape, or an impossible request)."""


class ReportError(TieremuError):
    """A result folder cannot be reported on: missing files, a partial or failed run, unreadable metrics."""


class BackendError(TieremuError):
    """A sweep backend cannot be used: Ray missing, or its cluster unreachable; the message names the address."""
