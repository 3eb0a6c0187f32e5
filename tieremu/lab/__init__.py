"""Root-only lab profiles: declared kernel settings that turn a server into a CXL or remote-memory testbed.

Each knob is an action that records the old value before it writes, so teardown restores the machine
exactly, even after a crash. `active_profiles` is what a run manifest records.
"""

from __future__ import annotations

from tieremu.lab.status import active_profiles

__all__ = ["active_profiles"]
