"""Resolving adapters named in a recipe to local directories (and, later, pushing results)."""

from __future__ import annotations

from pathlib import Path

from .errors import MergeError
from .recipe import AdapterRef


def resolve_adapter(ref: AdapterRef) -> Path:
    """A local adapter directory for ``ref``: the path itself when it exists locally."""
    path = Path(ref.adapter).expanduser()
    if path.is_dir():
        return path
    raise MergeError(f"adapter {ref.adapter!r} is not a local directory", adapter=ref.name)
