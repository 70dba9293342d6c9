"""The marker that makes a directory ours: ``.mergekit-lowrank.json`` lists every file a merge wrote.

    {"format": "mergekit-lowrank/output", "version": 1, "files": ["README.md", "adapter_config.json", …]}
Only a directory whose marker lists everything in it may be replaced; the marker itself is never published.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

MARKER = ".mergekit-lowrank.json"
OUTPUT_FORMAT = "mergekit-lowrank/output"
VERSION = 1


def owned_files(out: Path) -> set[str] | None:
    """The files our marker in ``out`` lists (the marker itself included), or None if it is not ours."""
    try:
        marker = json.loads((out / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("format") != OUTPUT_FORMAT or not isinstance(marker.get("files"), list):
        return None
    return {f for f in marker["files"] if isinstance(f, str)} | {MARKER}


def write_marker(path: Path) -> None:
    """Record every file under ``path`` in its marker: what a later ``--overwrite`` may delete."""
    files = sorted(str(p.relative_to(path)) for p in walk(path) if p.name != MARKER or p.parent != path)
    (path / MARKER).write_text(json.dumps({"format": OUTPUT_FORMAT, "version": VERSION, "files": files}, indent=1) + "\n")


def walk(root: Path):
    """Every file under ``root`` and every symlink to a directory (not followed)."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            yield Path(dirpath, name)
