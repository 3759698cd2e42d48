"""The error a scenario file or value raises."""

from __future__ import annotations

from notekv.errors import NotekvError


class ScenarioError(NotekvError, ValueError):
    """A scenario file or value that cannot produce aligned pairs."""
