"""Loading models and tokenizers by path or hub name, with errors a user can act on.

Shared by the teacher engine (stage 1), training and evaluation (stage 2).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from logitcache.errors import LogitCacheError


def _looks_like_path(name: str) -> bool:
    # "org/model" is a hub id; "./x", "/x", "a/b/c" are paths.
    parts = name.split("/")
    is_hub_id = len(parts) == 2 and all(parts) and not name.startswith((".", "/"))
    return name.startswith((".", "/", "~")) or (os.sep in name and not is_hub_id)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def check_exists(name: str, option: str) -> None:
    """A local path that does not exist is a typo, not a hub name: say so before any download."""
    if _looks_like_path(name) and not Path(name).exists():
        raise LogitCacheError(f"{option} {name}: no such directory; give a model directory or a hub name.")


def load_tokenizer(name: str, option: str, **kwargs: Any):
    from transformers import AutoTokenizer

    check_exists(name, option)
    try:
        return AutoTokenizer.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as e:
        raise LogitCacheError(
            f"{option} {name}: could not load its tokenizer ({_first_line(e)}); give a directory holding "
            "a tokenizer's files (tokenizer.json) or a hub name."
        ) from e


def load_causal_lm(name: str, option: str, **kwargs: Any):
    from transformers import AutoModelForCausalLM

    check_exists(name, option)
    try:
        return AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as e:
        raise LogitCacheError(f"{option} {name}: could not load it as a causal LM ({_first_line(e)}).") from e
