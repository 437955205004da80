"""Soak mode: ``DURABLE_ASGI_SOAK=1`` (or a factor) runs the property-based fault and
bad-input tests with many more examples, unreproducibly (CI stays derandomized)."""

from __future__ import annotations

import os

__all__ = ["examples", "soak_factor"]


def soak_factor() -> int:
    raw = os.environ.get("DURABLE_ASGI_SOAK", "").strip()
    if raw in ("", "0"):
        return 0
    return 20 if raw == "1" else int(raw)


def examples(ci: int) -> int:
    """`ci` examples in CI; many more in soak mode."""
    return ci * soak_factor() if soak_factor() else ci
