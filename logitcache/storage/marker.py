"""A marker file that says "this directory is being made": what a run killed half-way left is
removed by the next run, and nothing else ever is.

Used by the writer (a new cache, ``.init``) and by merge (``.merging``). The marker is written
first and lists every name the job may create in the directory; the job removes it when the
directory is whole. A rerun that finds it removes exactly those names, and refuses, touching
nothing, if the directory holds anything else or a marker that logitcache did not write.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Iterable

from logitcache.errors import LogitCacheError


def write_marker(directory: Path, name: str, creates: Iterable[str]) -> None:
    """Write (and fsync) the marker ``name`` listing ``creates``; before the job makes anything.

    Not an atomic write: a kill mid-way would leave its temp file and no marker. A marker cut
    short by a kill is empty, and :func:`clear_marked` accepts an empty one in an otherwise
    empty directory.
    """
    with open(directory / name, "w", encoding="utf-8") as f:
        f.write(json.dumps({"logitcache": name, "creates": sorted(creates)}))
        f.flush()
        os.fsync(f.fileno())


def clear_marked(directory: Path, name: str, keep: Iterable[str] = ()) -> None:
    """Remove what the job behind the marker ``name`` made (the names it lists), or refuse.

    ``keep``: names that are never removed nor counted as foreign (the lock file). The marker
    itself stays; the job that starts over rewrites it.
    """
    marker = directory / name
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
        creates = set(data["creates"]) if data.get("logitcache") == name else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        creates = None  # empty (killed while writing it) or not ours
    others = sorted(p.name for p in directory.iterdir() if p.name not in {name, *keep})

    def refuse(what: str, names: list[str]) -> LogitCacheError:
        listed = f" and files logitcache did not create ({', '.join(names[:5])}{' ...' if len(names) > 5 else ''})"
        return LogitCacheError(
            f"{directory} holds {what}{listed if names else ''}; nothing was removed. Choose a new or empty "
            f"directory, or remove {name} if the directory is not logitcache's."
        )

    if creates is None:
        if others or marker.stat().st_size:
            raise refuse(f"a {name} file that logitcache did not write", others)
        creates = set()  # killed while writing the marker, before making anything
    foreign = [n for n in others if n not in creates]
    if foreign:
        raise refuse(f"what a killed job half made ({name})", foreign)
    for n in others:
        p = directory / n
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
