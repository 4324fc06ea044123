"""The --config file that `teacher` and `train` read: a YAML (or JSON) mapping of option: value."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from logitcache.errors import LogitCacheError


def read_config_mapping(path: str | os.PathLike) -> dict[str, Any]:
    """The file's mapping, or one line naming what is wrong with it (missing, not YAML, not a mapping)."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise LogitCacheError(f"--config {path}: no such file.")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise LogitCacheError(f"--config {path}: not valid YAML ({str(e).splitlines()[0]}).") from e
    if not isinstance(data, dict):
        raise LogitCacheError(f"--config {path}: expected a mapping of option: value.")
    return data
