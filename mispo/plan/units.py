"""Byte units and the number formats of the plan's texts."""

from __future__ import annotations

GiB = 1024**3


def fmt_gib(b: float) -> str:
    return f"{b / GiB:,.1f} GiB" if b >= GiB else f"{b / 2**20:,.1f} MiB"


def fmt_bytes(b: float) -> str:
    """fmt_gib, switching to TiB from 1024 GiB (communication volumes)."""
    return f"{b / 1024**4:,.1f} TiB" if b >= 1024**4 else fmt_gib(b)


def fmt_kib(b: float) -> str:
    return f"{b / 1024:,.1f} KiB"


def fmt_count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))
