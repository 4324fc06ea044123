"""One writer per remote cache: a lease object with an owner and an expiry.

    with Lease("s3://bucket/cache"):
        ...  # write the cache; a second writer pointed at the URL refuses

Object stores have no flock, so the lock of storage/lock.py becomes an object,
``<url>/.lease.json``, holding JSON {owner, host, pid, command, doing, acquired, expires}.
A background thread renews it (every third of its time to live, ``LOGITCACHE_LEASE_SECONDS``,
default 120 s), so it stays live while its writer runs and lapses soon after the writer dies.

Acquiring: the object is created with a conditional PUT (S3's ``If-None-Match: *``, through
fsspec's ``mode="create"``), so of two writers starting together exactly one gets it. A lease
already there is refused in one line naming its holder and expiry, unless it has expired, or
its holder ran on this host and is gone (a killed run: the rerun need not wait for the expiry);
then it is taken over with a notice. Taking over and renewing replace the object only if it is
unchanged since read (S3's ``If-Match`` on its ETag). :meth:`Lease.check`, called before every
upload, refuses once the lease was taken over (seen at a renewal) or has gone unrenewed for its
whole time to live (the process stalled: another writer may hold it by now), so a stalled writer
stops before it overwrites anything.

Race window: on filesystems without conditional writes (anything but s3fs here; fsspec's
``mode="create"`` is checked where the filesystem offers it), two writers taking over the same
expired lease within one round trip may both believe they hold it; the later PUT wins and the
earlier writer stops at its next renewal, when it reads back another owner.
Released at the end: the object is deleted, if it is still ours.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

from logitcache.errors import LogitCacheError
from logitcache.storage.lock import LockHolder
from logitcache.storage.remote import url_fs, with_retries

LEASE_NAME = ".lease.json"
TTL_ENV = "LOGITCACHE_LEASE_SECONDS"
DEFAULT_TTL = 120.0


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _stamp(t: datetime) -> str:
    return t.isoformat(timespec="seconds")


class Lease:
    """The lease on the remote cache at ``url`` (a URL whose filesystem fsspec knows)."""

    def __init__(self, url: str, *, purpose: str = "writing to", ttl: float | None = None) -> None:
        self.url = url.rstrip("/")
        self.purpose = purpose
        self.ttl = float(ttl if ttl is not None else os.environ.get(TTL_ENV, DEFAULT_TTL))
        if self.ttl <= 0:
            raise LogitCacheError(f"{TTL_ENV}={self.ttl:g}: the lease's time to live must be positive seconds.")
        self.owner = uuid.uuid4().hex
        self.fs, root = url_fs(url)
        self.path = f"{root}/{LEASE_NAME}"
        self.taken_over: dict[str, Any] | None = None
        self.lost: str | None = None  # why the lease is no longer ours
        self._etag: str | None = None
        self._acquired: str | None = None
        self._renewed = 0.0  # time.monotonic() of the last write of our lease
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- the object --------------------------------------------------------------------
    def _body(self) -> bytes:
        now = _now()
        return json.dumps({
            "owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(),
            "command": " ".join(sys.argv)[:500], "doing": self.purpose,
            "acquired": self._acquired or _stamp(now), "expires": _stamp(now + timedelta(seconds=self.ttl)),
        }).encode()

    def _read(self) -> tuple[dict[str, Any] | None, str | None]:
        """(the lease's content, its ETag); (None, None) when there is none."""
        def read() -> tuple[dict[str, Any] | None, str | None]:
            self.fs.invalidate_cache()
            try:
                info = self.fs.info(self.path)
                data = self.fs.cat_file(self.path)
            except FileNotFoundError:
                return None, None
            try:
                content = json.loads(data)
            except ValueError:
                content = {}
            return (content if isinstance(content, dict) else {}), info.get("ETag")

        return with_retries(f"reading the lease {self.url}/{LEASE_NAME}", read)

    def _create(self) -> bool:
        """Create the lease object if there is none; False if one is there."""
        body = self._body()

        def create() -> bool:
            try:
                self.fs.pipe_file(self.path, body, mode="create")
            except FileExistsError:
                return False
            except TypeError:  # a filesystem without conditional create: see the race window above
                if self.fs.exists(self.path):
                    return False
                self.fs.pipe_file(self.path, body)
            return True

        sent = time.monotonic()
        made = with_retries(f"creating the lease {self.url}/{LEASE_NAME}", create)
        if made:
            self._etag = self._read()[1]
            self._renewed = sent
        return made

    def _replace(self, etag: str | None) -> bool:
        """Write our lease over the one with ``etag``; False if it changed meanwhile."""
        body = self._body()

        def put() -> bool:
            if hasattr(self.fs, "call_s3") and etag:
                bucket, key, _ = self.fs.split_path(self.path)
                try:
                    out = self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=body, IfMatch=etag)
                except OSError as e:
                    if "pre-condition" in str(e).lower() or "precondition" in str(e).lower():
                        return False
                    raise
                self._etag = out.get("ETag")
                return True
            self.fs.pipe_file(self.path, body)
            content, self._etag = self._read()
            return bool(content) and content.get("owner") == self.owner

        sent = time.monotonic()
        ok = with_retries(f"writing the lease {self.url}/{LEASE_NAME}", put)
        if ok:
            self._renewed = sent
        return ok

    # --- acquire, renew, release ---------------------------------------------------------
    def acquire(self) -> "Lease":
        self._acquired = _stamp(_now())
        while not self._create():
            content, etag = self._read()
            if content is None:
                continue  # released between our create and our read: try again
            if not _takeable(content):
                raise self._refusal(content)
            if self._replace(etag):
                self.taken_over = content
                why = "is no longer running" if _dead_here(content) else f"expired at {content.get('expires', '?')}"
                print(f"logitcache: taking over the lease on {self.url} left by {_describe(content)}, which {why}.",
                      file=sys.stderr)
                break
        self._thread = threading.Thread(target=self._renew_loop, daemon=True, name="logitcache-lease")
        self._thread.start()
        return self

    def _refusal(self, content: dict[str, Any]) -> LogitCacheError:
        return LogitCacheError(
            f"another logitcache process ({_describe(content)}) is {content.get('doing') or 'writing to'} {self.url}, "
            f"its lease expires at {content.get('expires', '?')}; wait for it to finish or stop it, then rerun "
            f"(a stopped writer's lease is taken over once it expires; if it is surely gone, delete {self.url}/{LEASE_NAME})."
        )

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                if not self._replace(self._etag):
                    content, _ = self._read()
                    self.lost = f"taken over by {_describe(content or {})}"
                    return
            except LogitCacheError as e:  # the store is unreachable: the next renewal tries again
                print(f"logitcache: could not renew the lease on {self.url}: {e}", file=sys.stderr)

    def check(self) -> None:
        """Raise if the lease is no longer surely ours (call before publishing anything): taken
        over, or not renewed within its time to live (then another writer may hold it by now)."""
        if self.lost is None and self._renewed and time.monotonic() - self._renewed > self.ttl:
            self.lost = f"not renewed for {time.monotonic() - self._renewed:.0f} s, past its {self.ttl:g} s time to live"
        if self.lost is not None:
            raise LogitCacheError(
                f"the lease on {self.url} was {self.lost} (this run stalled past its expiry); "
                "stopped before publishing anything more; what is listed in its manifest is whole."
            )

    def release(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        if self.lost is not None:
            return
        try:
            content, _ = self._read()
            if content is not None and content.get("owner") == self.owner:
                with_retries(f"removing the lease {self.url}/{LEASE_NAME}", lambda: self.fs.rm_file(self.path))
        except LogitCacheError as e:  # it expires by itself
            print(f"logitcache: could not remove the lease on {self.url} ({e}); it expires by itself.", file=sys.stderr)

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _expires(content: dict[str, Any]) -> datetime | None:
    try:
        return datetime.fromisoformat(str(content["expires"]))
    except (KeyError, ValueError):
        return None


def _holder(content: dict[str, Any]) -> LockHolder:
    pid = content.get("pid")
    return LockHolder(pid=pid if isinstance(pid, int) else None, host=content.get("host"),
                      started=content.get("acquired"), doing=content.get("doing"))


def _dead_here(content: dict[str, Any]) -> bool:
    holder = _holder(content)
    return holder.pid is not None and holder.host == socket.gethostname() and not holder.alive_here()


def _takeable(content: dict[str, Any]) -> bool:
    """An expired lease (or an unreadable one), or one whose holder ran here and is gone."""
    expires = _expires(content)
    return expires is None or expires <= _now() or _dead_here(content)


def _describe(content: dict[str, Any]) -> str:
    return _holder(content).describe()


__all__ = ["LEASE_NAME", "Lease"]
