"""Swapping a mergekit function in place while keeping the original reachable (what every patch needs)."""

from __future__ import annotations

_MARK = "__lowrank_methods_original__"


def original(owner, name: str):
    """The mergekit function a patch replaced (the function itself when unpatched)."""
    fn = getattr(owner, name)
    return getattr(fn, _MARK, fn)


def replace(owner, name: str, replacement) -> None:
    """Put ``replacement`` at ``owner.name``, remembering what was there (idempotent)."""
    current = getattr(owner, name)
    if hasattr(current, _MARK):
        return
    setattr(replacement, _MARK, current)
    setattr(owner, name, replacement)
