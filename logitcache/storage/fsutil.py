"""Durable file operations: a file is either absent or complete, never half-written.

Crash testing: ``crash_point(name)`` marks a moment where a killed process must leave a
cache that a rerun completes exactly. With ``LOGITCACHE_CRASH_AT=<name>:<n>`` in the
environment, the process SIGKILLs itself the n-th time it reaches that point;
``LOGITCACHE_CRASH_AT=<name>:<n>:<ERRNO>`` (e.g. ``shard.row_group:2:ENOSPC``) raises that
OSError there instead, as a failing disk would. Unset (always, outside tests), a point costs
one environment lookup. tests/test_kill_anywhere.py lists the points and kills at each.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import signal
import stat
from pathlib import Path

from logitcache.errors import LogitCacheError

_CHUNK = 1 << 20
CRASH_ENV = "LOGITCACHE_CRASH_AT"
_crash_counts: dict[str, int] = {}


def crash_point(name: str) -> None:
    """A named moment for fault injection (see the module docstring); a no-op unless asked."""
    spec = os.environ.get(CRASH_ENV)
    if spec is not None:
        _inject(spec, name)


def _inject(spec: str, name: str) -> None:
    target, _, rest = spec.partition(":")
    if target != name:
        return
    nth, _, error = rest.partition(":")
    _crash_counts[name] = _crash_counts.get(name, 0) + 1
    if _crash_counts[name] != int(nth):
        return
    if error:
        code = getattr(errno, error)
        raise OSError(code, os.strerror(code))
    os.kill(os.getpid(), signal.SIGKILL)


def temp_name(path: str | os.PathLike) -> Path:
    """Where ``atomic_write_bytes`` stages ``path``; a leftover one is from a killed run."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp")


def sha256_file(path: str | os.PathLike) -> str:
    """The sha256 of a regular file. Anything else is refused: a FIFO or a device (``/dev/zero``)
    in a hostile cache would make hashing block or never end."""
    # O_NONBLOCK: opening a FIFO with no writer would otherwise block before fstat could refuse it.
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise LogitCacheError(f"{path}: not a regular file (a FIFO, device or directory); refused.")
    with os.fdopen(fd, "rb") as f:
        h = hashlib.sha256()
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def fsync_dir(path: str | os.PathLike) -> None:
    """Persist a rename: the directory entry must reach the disk, not just the file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file, fsync and rename."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            crash_point("atomic.written")
            os.fsync(f.fileno())
        crash_point("atomic.synced")
        os.replace(tmp, path)
    except BaseException:
        _remove_quietly(tmp)  # a failed write (disk full) must not leave half a file behind
        raise
    crash_point("atomic.renamed")
    fsync_dir(path.parent)


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def publish(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """Make a finished temp file visible under its final name (fsync, rename, fsync dir)."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    crash_point("publish.synced")
    os.replace(tmp, final)
    crash_point("publish.renamed")
    fsync_dir(Path(final).parent)


def hash_files(directory: str | os.PathLike) -> tuple[str, dict[str, str]]:
    """sha256 of every file in ``directory`` and one digest over all of them (name-sorted)."""
    directory = Path(directory)
    files = {
        p.relative_to(directory).as_posix(): sha256_file(p)
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }
    combined = hashlib.sha256("".join(f"{n}\0{h}\n" for n, h in files.items()).encode()).hexdigest()
    return combined, files


def current_umask() -> int:
    """The process's umask. Linux shows it in /proc; elsewhere setting and restoring it is the
    only way to read it (a moment in which another thread would create files with mode 0)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(root: str | os.PathLike) -> None:
    """Give ``root`` and everything in it the modes a plain create under the umask gives.
    For files that libraries write private (safetensors: 0600), which a team could not read."""
    mask = current_umask()
    root = Path(root)
    for p in [root, *root.rglob("*")]:
        if p.is_symlink():
            continue
        p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


def copy_files(src: Path, dst: Path) -> None:
    """Copy a folder file by file, contents only. Not shutil.copytree: it gathers every failure
    into one shutil.Error holding a list, with no errno, so a full disk could not be told in one
    line. Not copy2 or copystat either: they carry the source's mode over (a temp folder's 0700,
    a part written under another umask), and a shared cache must get the writer's umask."""
    dst.mkdir(parents=True, exist_ok=True)
    for p in sorted(src.rglob("*")):
        target = dst / p.relative_to(src)
        if p.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            shutil.copyfile(p, target)
