"""Byte counts for people: the package's one formatter (binary units), at the bottom of the layers so
that the runtime (``dataset``'s log line) and the reports (``summary``, the Hub card) share it."""

from __future__ import annotations

__all__ = ["format_bytes"]

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def format_bytes(n: float) -> str:
    """A byte count in binary units, for people: ``1536`` -> ``'1.5 KiB'``, ``512`` -> ``'512 B'``.

    Args:
        n: the number of bytes.

    Returns:
        Whole bytes below 1 KiB, otherwise one decimal in the largest unit (up to TiB) that keeps
        the number at or above 1.
    """
    x = float(n)
    for unit in _UNITS:
        if abs(x) < 1024 or unit == _UNITS[-1]:
            return f"{x:.0f} {unit}" if unit == "B" else f"{x:.1f} {unit}"
        x /= 1024
    raise AssertionError("unreachable")  # pragma: no cover
