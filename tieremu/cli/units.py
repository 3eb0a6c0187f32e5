"""Units for what the commands print, one rule everywhere: amounts moved and rates are decimal (kB, MB, GB; kB/s,
MB/s, GB/s, as STREAM and fio count), memory sizes are binary (KiB, MiB, GiB, as the kernel allocates), and each
figure takes the unit that suits its magnitude, so no line mixes GiB with GB/s."""

from __future__ import annotations

_DECIMAL = (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3))
_BINARY = (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10))


def amount(n_bytes: float) -> str:
    """Bytes moved or read, decimal: `661.6 GB`, `12.0 MB`, `512 B`."""
    for unit, size in _DECIMAL:
        if abs(n_bytes) >= size:
            return f"{n_bytes / size:,.1f} {unit}"
    return f"{n_bytes:,.0f} B"


def rate(gb_per_s: float) -> str:
    """A transfer rate given in GB/s, shown in the unit of its magnitude: `0.647 GB/s`, `12.3 MB/s`."""
    for unit, scale in (("GB/s", 1.0), ("MB/s", 1e-3), ("kB/s", 1e-6)):
        if abs(gb_per_s) >= scale:
            return f"{gb_per_s / scale:,.3g} {unit}" if gb_per_s / scale < 100 else f"{gb_per_s / scale:,.0f} {unit}"
    return f"{gb_per_s * 1e9:,.0f} B/s"


def size(n_bytes: float) -> str:
    """A memory size, binary: `64 MiB`, `16 KiB`, `1.5 GiB`."""
    for unit, scale in _BINARY:
        if abs(n_bytes) >= scale:
            return f"{n_bytes / scale:,.4g} {unit}"
    return f"{n_bytes:,.0f} B"
