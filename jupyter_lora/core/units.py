"""Numbers and byte sizes as people read them, for messages and renderings: ``1.23M`` parameters, ``1.5 GiB``."""

from __future__ import annotations

__all__ = ["fmt_bytes", "fmt_count"]


def fmt_count(n: int) -> str:
    """1234567 -> '1.23M'."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            value = n / size
            return f"{value:.3g}{unit}" if value < 100 else f"{value:.0f}{unit}"
    return str(n)


def fmt_bytes(n: int) -> str:
    """Bytes in binary units: '1.5 GiB'."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            if unit == "B" or value >= 100:
                return f"{value:.0f} {unit}"
            return f"{value:.3g} {unit}"
        value /= 1024
    raise AssertionError
