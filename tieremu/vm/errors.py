"""Why the guest cannot run here; the CLI reports it as one line and a distinct exit code."""

from __future__ import annotations

from tieremu.errors import TieremuError


class VmUnavailable(TieremuError):
    """Something the guest needs is missing or failed before the guest booted (QEMU, kernel, busybox)."""
