"""The appearance domains amgen names in layout metadata and retrieval filters."""
from __future__ import annotations

DOMAINS: tuple[str, ...] = ("day", "dusk", "night", "fog")
