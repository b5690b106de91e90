"""Byte counts for people: the one formatting rule of every message, report and table (pure).

>>> format_bytes(8), format_bytes(65536), format_bytes(1536), format_bytes(3 << 30)
('8 B', '64 KiB', '1.5 KiB', '3 GiB')
"""
from __future__ import annotations

#: Binary units, largest first (nccl-tests and the CLI's sizes are binary too).
BYTE_UNITS = (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10))


def format_bytes(n: float) -> str:
    """``n`` bytes in the largest binary unit it reaches: a whole number where the unit divides
    it (``64 KiB``), else one decimal (``1.5 MiB``); below 1 KiB, whole bytes (``1000 B``)."""
    for unit, scale in BYTE_UNITS:
        if abs(n) >= scale:
            whole = n == int(n) and int(n) % scale == 0
            return f"{int(n) // scale} {unit}" if whole else f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"
