"""One writer per cache directory: an exclusive lock that dies with its process.

    with CacheLock(out_dir):
        ...  # write the cache; a second process pointed at out_dir refuses

The lock is ``flock`` on ``DIR/.logitcache.lock``, which holds JSON {pid, host, started, doing} so
the process that is refused can say who holds it. The kernel drops an flock when its
process dies, however it dies (SIGKILL, OOM killer, a node reboot), so a lock left by a
killed run is never mistaken for a live one: the next run takes it over and says so.
A clean release deletes the file. On a filesystem without flock (some Lustre/NFS mounts)
the lock falls back to the pid in the file: alive on this host means held.

Only writers lock; readers (verify, students) never wait for a lock.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from logitcache.errors import LogitCacheError

LOCK_NAME = ".logitcache.lock"
# flock fails with these where the filesystem does not support it.
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


@dataclass(frozen=True)
class LockHolder:
    """Who wrote the lock file (any field may be unknown: a holder killed before writing it)."""

    pid: int | None = None
    host: str | None = None
    started: str | None = None
    doing: str | None = None  # "writing to", "merging into"

    def describe(self) -> str:
        if self.pid is None:
            return "pid unknown"
        return f"pid {self.pid} on host {self.host or '?'}, started {self.started or '?'}"

    def alive_here(self) -> bool:
        """Whether this pid may be running: surely not only if it is gone from this host."""
        if self.pid is None or self.host != socket.gethostname():
            return self.pid is not None  # another host: we cannot tell, assume it runs
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # exists, owned by someone else
            return True
        return True


class CacheLock:
    """Exclusive lock on a directory that a logitcache process writes (created if missing).

    Directories that ``acquire`` creates are removed again by ``release`` if nothing else was
    put in them, so a run refused early leaves no trace.
    """

    def __init__(self, directory: str | os.PathLike, *, purpose: str = "writing to") -> None:
        """``purpose`` completes "another logitcache process is ... DIR" for whoever is refused."""
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self.purpose = purpose
        self.taken_over: LockHolder | None = None  # set when a dead holder's lock was taken
        self._fd: int | None = None
        self._made: list[Path] = []

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "CacheLock":
        if self._fd is not None:
            return self
        d = self.directory
        if d.exists() and not d.is_dir():
            raise LogitCacheError(f"{d} is a file; give a directory for the cache.")
        self._made = _make_dirs(d)
        try:
            fd = self._open_locked()
        except BaseException:
            self._remove_made_dirs()
            raise
        previous = _read_holder(fd)
        if previous.pid is not None and previous.pid != os.getpid():
            # A clean release deletes the file: one still there was left by a holder that died.
            self.taken_over = previous
            print(
                f"logitcache: taking over the lock on {d} left by {previous.describe()}, "
                "which is no longer running.",
                file=sys.stderr,
            )
        _write_holder(fd, self.purpose)
        self._fd = fd
        return self

    def _open_locked(self) -> int:
        while True:
            # 0o666: the umask decides, as for every file we write (a team shares a cache).
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            try:
                if not self._lock(fd):
                    raise self._refusal(_read_holder(fd))
                # The holder we waited on may have released (deleted) the file between our
                # open and our flock: then we locked a file nobody else sees. Start again.
                if _same_file(fd, self.path):
                    return fd
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)

    def _lock(self, fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        except OSError as e:
            if e.errno not in _NO_FLOCK:
                raise
        holder = _read_holder(fd)  # no flock here: the pid in the file decides
        return holder.pid in (None, os.getpid()) or not holder.alive_here()

    def _refusal(self, holder: LockHolder) -> LogitCacheError:
        if holder.pid is not None and not holder.alive_here():
            # The flock outlives its taker when a process it forked (an engine worker) lives on.
            return LogitCacheError(
                f"{self.directory} is still locked although {holder.describe()} is gone: a process it "
                f"started still holds {self.path}; stop it (`fuser -v {self.path}` names it), then rerun."
            )
        return LogitCacheError(
            f"another logitcache process ({holder.describe()}) is {holder.doing or 'writing to'} {self.directory}; "
            f"wait for it to finish or stop it, then rerun (if it is surely gone, delete {self.path})."
        )

    def release(self) -> None:
        if self._fd is None:
            return
        # Delete while still holding it (acquire checks it locked the file that is there).
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None
        self._remove_made_dirs()

    def _remove_made_dirs(self) -> None:
        for d in self._made:  # innermost first
            try:
                d.rmdir()
            except OSError:  # something was put there: it stays
                break
        self._made = []

    def __enter__(self) -> "CacheLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _make_dirs(d: Path) -> list[Path]:
    """mkdir -p, returning the directories it created, innermost first."""
    missing = []
    for p in (d, *d.parents):
        if p.exists():
            break
        missing.append(p)
    d.mkdir(parents=True, exist_ok=True)
    return missing


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def _read_holder(fd: int) -> LockHolder:
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"{}")
        pid = data.get("pid")
        return LockHolder(
            pid=pid if isinstance(pid, int) else None, host=data.get("host"), started=data.get("started"),
            doing=data.get("doing"),
        )
    except (ValueError, AttributeError, OSError):  # empty, torn or foreign content
        return LockHolder()


def _write_holder(fd: int, doing: str) -> None:
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    data = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": started, "doing": doing}).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


__all__ = ["LOCK_NAME", "CacheLock", "LockHolder"]
