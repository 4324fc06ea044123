"""Caches on object storage and the Hub: which paths are URLs, and the fsspec filesystem for one.

A cache or output path may be a plain path or an fsspec URL (``s3://bucket/cache``,
``gs://``, ``az://``, ``hf://datasets/me/cache``, ``file://``). Plain paths and ``file://``
stay on the local code path; anything else goes through :func:`url_fs`, which names the
optional extra to install when the protocol's package is missing and turns credential and
bucket errors into one line. Endpoints and credentials come from each protocol's usual
environment (``AWS_*``; fsspec's ``FSSPEC_S3_ENDPOINT_URL`` for MinIO or a loopback server).
"""

from __future__ import annotations

import os
import random
import time
from typing import Any, Callable, TypeVar

from logitcache.errors import LogitCacheError

T = TypeVar("T")

# protocol -> (the extra that installs its package, the package's import name)
EXTRAS: dict[str, tuple[str, str]] = {
    "s3": ("s3", "s3fs"),
    "s3a": ("s3", "s3fs"),
    "gs": ("gcs", "gcsfs"),
    "gcs": ("gcs", "gcsfs"),
    "az": ("azure", "adlfs"),
    "abfs": ("azure", "adlfs"),
    "abfss": ("azure", "adlfs"),
    "hf": ("hub", "huggingface_hub"),
    "memory": ("", ""),  # fsspec's own in-process filesystem (tests, examples)
}

# Protocols whose first path component is a bucket (container) that must exist beforehand.
BUCKET_PROTOCOLS = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss")


def protocol_of(path: str | os.PathLike) -> str | None:
    """``"s3"`` for ``s3://b/c``; None for a plain path. ``file://`` counts as plain."""
    text = os.fspath(path)
    if "://" not in text:
        return None
    proto = text.split("://", 1)[0].lower()
    return None if proto in ("file", "local") else proto


def is_url(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a remote cache (an fsspec URL other than ``file://``)."""
    return protocol_of(path) is not None


def local_path(path: str | os.PathLike) -> str:
    """A plain path for a plain path or a ``file://`` URL."""
    text = os.fspath(path)
    for prefix in ("file://", "local://"):
        if text.lower().startswith(prefix):
            return text[len(prefix):]
    return text


def check_protocol(url: str) -> str:
    """The URL's protocol, once its package can be imported; else one line naming the extra."""
    proto = protocol_of(url)
    if proto is None:
        raise LogitCacheError(f"{url}: not a URL.")
    if proto not in EXTRAS:
        known = ", ".join(f"{p}://" for p in ("s3", "gs", "az", "hf", "file"))
        raise LogitCacheError(f"{url}: unknown protocol {proto}://; use a plain path or one of {known}.")
    extra, module = EXTRAS[proto]
    if module:
        try:
            __import__(module)
        except ImportError:
            raise LogitCacheError(
                f"{url}: {proto}:// needs the {module} package; pip install 'logitcache[{extra}]'."
            ) from None
    return proto


def url_fs(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) for a remote URL; errors are one line."""
    check_protocol(url)
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(url)
    except (ValueError, TypeError, ImportError) as e:
        raise LogitCacheError(f"{url}: {e}") from None
    return fs, root.rstrip("/")


# Errors worth another try: the connection, a timeout, a 5xx the client surfaced as OSError.
# A missing object, a refused permission or bad credentials are not retried.
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)


def is_transient(e: BaseException) -> bool:
    """Whether an error from a remote filesystem may go away on a retry."""
    if isinstance(e, _PERMANENT) or isinstance(e, LogitCacheError):
        return False
    name = type(e).__name__
    if isinstance(e, (ConnectionError, TimeoutError)) or "Timeout" in name or "Connect" in name:
        return True
    return isinstance(e, OSError) and getattr(e, "errno", None) is None and "ClientError" not in name


def with_retries(what: str, fn: Callable[[], T], *, attempts: int | None = None, base_delay: float = 0.5) -> T:
    """Run ``fn``; on a transient error wait (exponential backoff with jitter) and try again.

    After ``attempts`` tries (``LOGITCACHE_REMOTE_RETRIES``, default 5) the last error becomes
    one line naming ``what``; permanent errors are raised at once as :func:`remote_error` says.
    """
    if attempts is None:
        attempts = int(os.environ.get("LOGITCACHE_REMOTE_RETRIES", "5"))
    for attempt in range(1, max(1, attempts) + 1):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - sorted into transient and permanent below
            if not is_transient(e):
                raise remote_error(what, e) from e
            if attempt >= attempts:
                raise LogitCacheError(
                    f"{what}: the storage did not answer after {attempts} tries ({_short(e)}); "
                    "check the network and the endpoint, then rerun (finished work is kept)."
                ) from e
            time.sleep(base_delay * 2 ** (attempt - 1) * (0.5 + random.random()))
    raise AssertionError("unreachable")


def remote_error(what: str, e: BaseException) -> LogitCacheError:
    """One line for a permanent error of a remote filesystem (credentials, bucket, permission)."""
    if isinstance(e, LogitCacheError):
        return e
    text = _short(e)
    low = text.lower()
    if "bucket" in low and ("not exist" in low or "nosuchbucket" in low):
        hint = "the bucket does not exist; create it or check the URL"
    elif isinstance(e, PermissionError) or any(w in low for w in ("accessdenied", "access denied", "forbidden",
                                                                     "invalidaccesskeyid", "signature",
                                                                     "credentials", "security token")):
        hint = "the storage refused the credentials; check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or the protocol's own)"
    elif isinstance(e, FileNotFoundError):
        hint = "no such object; check the URL"
    else:
        hint = "check the URL and the credentials"
    return LogitCacheError(f"{what}: {hint} ({text}).")


def _short(e: BaseException, limit: int = 200) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
