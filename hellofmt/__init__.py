"""hellofmt: distilled image datasets whose soft labels are generated on the fly (HeLlO)."""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import HellofmtError  # noqa: E402

__all__ = ["__version__", "HellofmtError"]
