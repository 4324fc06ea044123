"""What the hostile-input tests share (test_hostile_matrix, test_hostile_merge).

An attacker controls every byte of a cache and makes its hashes match. A test damages a copy one
way, runs the real console script in a child and checks that it refuses within bounds: no
traceback, under ``LIMIT_S`` seconds and ``LIMIT_RSS_KB`` of peak RSS.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from logitcache.storage.fsutil import sha256_file

LIMIT_S = 30
LIMIT_RSS_KB = 1 << 20  # 1 GiB
# The console script in a child that reports its peak RSS on the way out: VmHWM, the high-water
# mark of its own memory map (getrusage's ru_maxrss would include the forking test process's).
_RUN = ("import atexit, runpy, sys; "
        "atexit.register(lambda: print('MAXRSS_KB', next(l.split()[1] for l in open('/proc/self/status') "
        "if l.startswith('VmHWM:')), file=sys.stderr)); "
        "sys.argv = ['logitcache', *sys.argv[1:]]; runpy.run_module('logitcache', run_name='__main__')")


def run_cli(*args) -> tuple[subprocess.CompletedProcess, float, int]:
    """``logitcache *args`` in a child: (the finished process, seconds, peak RSS in KiB)."""
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", _RUN, *map(str, args)], capture_output=True, text=True,
                       timeout=120, check=False, env={**os.environ, "OMP_NUM_THREADS": "1"})
    seconds = time.perf_counter() - t0
    rss = [int(line.split()[1]) for line in r.stderr.splitlines() if line.startswith("MAXRSS_KB ")]
    return r, seconds, rss[-1] if rss else 0


def assert_bounded(r: subprocess.CompletedProcess, seconds: float, rss_kb: int) -> None:
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert seconds < LIMIT_S, f"{seconds:.1f} s"
    assert 0 < rss_kb < LIMIT_RSS_KB, f"peak RSS {rss_kb / 1024:.0f} MiB"


def error_lines(r: subprocess.CompletedProcess) -> list[str]:
    return [line for line in r.stderr.splitlines() if line.startswith("error: ")]


# --- the damage ---------------------------------------------------------------------------------


def edit_manifest(cache: Path, edit) -> None:
    """``edit(data)`` on the parsed manifest.json, written back."""
    path = cache / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def rehash(cache: Path, rel: str) -> None:
    """Make the manifest's size and sha256 of shard ``rel`` match its bytes again."""
    path = cache / rel

    def update(d):
        (entry,) = [s for s in d["shards"] if s["path"] == rel]
        entry.update(bytes=path.stat().st_size, sha256=sha256_file(path))

    edit_manifest(cache, update)


def rewrite_shard(cache: Path, rel: str, change) -> None:
    """Shard ``rel`` rewritten as ``change(table)``, its hash made to match."""
    path = cache / rel
    pq.write_table(change(pq.read_table(path)), path)
    rehash(cache, rel)


def zlib_bomb(inflated_mib: int = 1024) -> bytes:
    """Base64 of a zlib stream of zeros that inflates to ``inflated_mib`` MiB (about 1.4 MB for a GiB).

    Made in milliseconds, without compressing (or holding) what it inflates to: one raw deflate
    block of a MiB of zeros, repeated (its back-references reach only zeros, which precede every
    copy), between a zlib header and the Adler-32 of that many zeros (a = 1, b = n mod 65521).
    """
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = deflate.compress(bytes(1 << 20)) + deflate.flush(zlib.Z_SYNC_FLUSH)  # ends byte-aligned
    adler = (((inflated_mib << 20) % 65521) << 16) | 1
    final_empty_block = b"\x03\x00"
    return base64.b64encode(b"\x78\xda" + block * inflated_mib + final_empty_block + adler.to_bytes(4, "big"))


def with_metadata(table: pa.Table, extra: dict[bytes, bytes]) -> pa.Table:
    return table.replace_schema_metadata({**(table.schema.metadata or {}), **extra})
