"""One file per merge method; importing this package registers them all (see registry.py)."""

from . import cat, mtc  # noqa: F401
