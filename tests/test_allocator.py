"""retain_freed_memory: on glibc it sets malloc to reuse freed blocks; a user's own settings win."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

CALL = "from logitcache.pipeline.allocator import retain_freed_memory; print(retain_freed_memory())"


def _run(**env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    clean.pop("LOGITCACHE_RETAIN_MEMORY", None)
    return subprocess.run([sys.executable, "-c", CALL], env={**clean, **env}, capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_it_changes_glibc_malloc() -> None:
    assert _run() == "True"


@pytest.mark.parametrize("env", [{"LOGITCACHE_RETAIN_MEMORY": "0"}, {"MALLOC_MMAP_THRESHOLD_": "65536"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}])
def test_it_leaves_alone_a_process_told_otherwise(env: dict[str, str]) -> None:
    assert _run(**env) == "False"
