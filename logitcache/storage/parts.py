"""The layout of a split teacher run: part i of n is the cache ``OUT/part-0000i-of-0000n``.

Kept apart from merge so that every reader (load_manifest) can tell a directory of parts
from a directory that is no cache at all, and say which command joins them.
"""

from __future__ import annotations

import re
from pathlib import Path

PART_GLOB = "part-*"
_PART_NAME = re.compile(r"part-(\d{5,})-of-(\d{5,})")


def part_name(index: int, count: int) -> str:
    """The directory of part ``index`` (0-based) of ``count`` inside the run's ``--out``."""
    return f"part-{index:05d}-of-{count:05d}"


def part_name_ok(name: str) -> bool:
    """Whether ``name`` is a part directory's name (``part-00001-of-00004``)."""
    return _PART_NAME.fullmatch(name) is not None


def part_dirs(run_dir: Path) -> list[Path]:
    """The part directories directly inside ``run_dir``, sorted; [] where it is no directory."""
    if not run_dir.is_dir():
        return []
    return sorted(d for d in run_dir.glob(PART_GLOB) if _PART_NAME.fullmatch(d.name) and d.is_dir())


def merge_command(run_dir: Path) -> str:
    """The command that joins the parts in ``run_dir`` (merge takes the run's --out as is)."""
    return f"`logitcache merge MERGED_DIR {run_dir}`"


def parts_summary(parts: list[Path]) -> str:
    """'3 parts (part-00000-of-00004 ... part-00003-of-00004)': what a directory of parts holds."""
    names = f"{parts[0].name}" if len(parts) == 1 else f"{parts[0].name} ... {parts[-1].name}"
    counts = {int(m.group(2)) for m in (_PART_NAME.fullmatch(p.name) for p in parts) if m}
    of = f" of {counts.pop()}" if len(counts) == 1 else ""
    return f"{len(parts)} part{'s' if len(parts) != 1 else ''}{of} ({names})"
