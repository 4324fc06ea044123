"""Moving a cache between a local directory and an fsspec URL: pull, push and copy, manifest last.

A cache on object storage or the Hub is written locally first (the hardened CacheWriter in a
staging directory) and uploaded object by object; this module holds the moves:

* :func:`push` uploads a local cache: shards, tokenizer files and card first, ``manifest.json``
  last, so a reader of the remote never sees a manifest that lists a shard not yet there.
* :func:`pull` makes a local directory agree with a remote cache (the remote is the truth):
  every listed shard and tokenizer file missing or different locally is downloaded and checked
  against the manifest's sha256, local shards the remote does not list are dropped, and the
  manifest is written last.
* :class:`Pusher` is the teacher's upload after each shard (the writer's ``on_commit``).
* :func:`copy_cache` copies any cache to any place (local, s3, hf, ...), verified and resumable.

Storage only: no torch. Crash points (storage/fsutil.py): ``upload.shard`` after each shard
object, ``upload.tokenizer`` after the tokenizer files, ``upload.manifest`` just before the
manifest, ``download.shard`` after each shard downloaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from logitcache.errors import LogitCacheError
from logitcache.storage.fsutil import atomic_write_bytes, crash_point, sha256_file
from logitcache.storage.lease import Lease
from logitcache.storage.manifest import MANIFEST_NAME, Manifest, check_manifest_size, load_manifest, parse_manifest
from logitcache.storage.marker import write_marker
from logitcache.storage.parts import PART_GLOB, part_name_ok
from logitcache.storage.remote import BUCKET_PROTOCOLS, is_url, local_path, protocol_of, url_fs, with_retries
from logitcache.storage.writer import CARD_NAME, DATA_DIR, TMP_PREFIX, TOKENIZER_DIR, layout_names

if TYPE_CHECKING:
    from logitcache.storage.merge import MergeReport

STAGING_ENV = "LOGITCACHE_STAGING"
COPY_MARKER = ".copying"  # in a local DST while `logitcache copy` fills it (storage/marker.py)

OnFile = Callable[[str, int, int], None]  # (stage, done, total)


def _nothing(stage: str, done: int, total: int) -> None:
    pass


@dataclass
class Place:
    """One end of a move: an fsspec filesystem and the cache's root in it (local or remote)."""

    url: str  # as the user wrote it
    fs: Any
    root: str
    local: bool

    @classmethod
    def of(cls, where: str | os.PathLike) -> "Place":
        text = os.fspath(where)
        if is_url(text):
            fs, root = url_fs(text)
            return cls(text, fs, root, False)
        from fsspec.implementations.local import LocalFileSystem

        path = Path(local_path(text)).expanduser().absolute()
        return cls(text, LocalFileSystem(), path.as_posix(), True)

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def name(self, rel: str) -> str:
        """``rel`` as the user would write it, for messages."""
        return f"{self.url.rstrip('/')}/{rel}"


def remote_place(url: str) -> Place:
    """The Place of a remote URL, once the URL's protocol, bucket and credentials are known good.

    Nothing local is created on the way: a typo in a bucket name must not leave an ``s3:`` folder.
    """
    place = Place.of(url)
    proto = protocol_of(url)
    if proto in BUCKET_PROTOCOLS:
        bucket = place.root.split("/", 1)[0]

        def probe() -> None:
            try:
                place.fs.ls(bucket)
            except FileNotFoundError:
                raise LogitCacheError(
                    f"{url}: the bucket {bucket} does not exist; create it (or check the URL), then rerun."
                ) from None

        with_retries(url, probe)
    return place


def read_manifest(place: Place) -> tuple[Manifest, bytes] | None:
    """The manifest at ``place`` and its bytes; None when there is none (a new or empty place)."""
    path = place.path(MANIFEST_NAME)
    if place.local:
        if not Path(path).is_file():
            return None
        return load_manifest(place.root), Path(path).read_bytes()

    def fetch() -> bytes | None:
        try:
            size = place.fs.info(path).get("size") or 0
        except FileNotFoundError:
            return None
        check_manifest_size(place.name(MANIFEST_NAME), size)
        return place.fs.cat_file(path)

    place.fs.invalidate_cache()
    data = with_retries(f"reading {place.name(MANIFEST_NAME)}", fetch)
    if data is None:
        return None
    return parse_manifest(data, place.name(MANIFEST_NAME)), data


def default_staging(url: str) -> Path:
    """Where a remote cache is staged unless ``--local-cache`` says: ``$LOGITCACHE_STAGING/<slug>``,
    else ``~/.cache/logitcache/staging/<slug>``. It holds a full local copy of the cache."""
    base = os.environ.get(STAGING_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "logitcache", "staging")
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", url.split("://", 1)[-1]).strip("-.")[:80]
    digest = hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:8]
    return Path(base) / f"{slug}-{digest}"


def staging_dir(url: str, local_cache: str | os.PathLike | None) -> Path:
    """The staging directory for ``url``: ``local_cache`` when given, else :func:`default_staging`."""
    return Path(local_cache).expanduser() if local_cache is not None else default_staging(url)


@dataclass
class SyncReport:
    """What a move did: objects sent and skipped (already there), and their bytes."""

    source: str
    dest: str
    copied: int = 0
    skipped: int = 0
    bytes: int = 0
    shards: int = 0
    files: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"copied {self.source} to {self.dest}: {self.shards} shard{'s' if self.shards != 1 else ''}, "
                f"{self.copied} file{'s' if self.copied != 1 else ''} copied ({self.bytes / 2**20:.1f} MiB), "
                f"{self.skipped} already there; every shard and tokenizer file matched the manifest's sha256")


def _listed_files(m: Manifest) -> list[tuple[str, str | None]]:
    """(path, sha256) of every file the manifest vouches for: tokenizer files, then shards."""
    tok = m.tokenizer.get("files") or {}
    return [(f"{TOKENIZER_DIR}/{name}", digest) for name, digest in sorted(tok.items())] + \
        [(s.path, s.sha256) for s in m.shards]


# --- pull: a remote cache into a local directory -------------------------------------------


def pull(src: Place, local_dir: Path, *, on_file: OnFile = _nothing, report: SyncReport | None = None,
         manifest: tuple[Manifest, bytes] | None = None, trusted: dict[str, tuple[str, int]] | None = None) -> SyncReport:
    """Make ``local_dir`` hold exactly the cache at ``src`` (which must have a manifest).

    A local file already there with the listed sha256 is kept; every other is downloaded under a
    temp name, checked and renamed. Local shards the source does not list are dropped. The
    manifest comes last, so a local directory with a manifest is always whole. ``trusted``:
    {path: (sha256, size)} that the local directory's own writer recorded (its manifest); a file
    of that size listed with that sha256 is kept without hashing it again (a resume of a big
    staging would otherwise read all of it).
    """
    report = report or SyncReport(src.url, str(local_dir))
    got = manifest or read_manifest(src)
    if got is None:
        raise LogitCacheError(f"{src.url}: no {MANIFEST_NAME} there, so it is not a logitcache cache; check the URL.")
    m, data = got
    (local_dir / DATA_DIR).mkdir(parents=True, exist_ok=True)
    files = _listed_files(m)
    for i, (rel, digest) in enumerate(files):
        target = local_dir / rel
        if target.is_file() and digest is not None and _same_local(target, rel, digest, trusted or {}):
            report.skipped += 1
        else:
            _download(src, rel, target, digest)
            report.copied += 1
            report.bytes += target.stat().st_size
            if rel.startswith(DATA_DIR + "/"):
                crash_point("download.shard")
        on_file("downloading", i + 1, len(files))
    _download_optional(src, CARD_NAME, local_dir / CARD_NAME)
    listed = {s.path for s in m.shards}
    for p in (local_dir / DATA_DIR).iterdir():  # what the source does not list (or a killed run's temp)
        if p.is_file() and f"{DATA_DIR}/{p.name}" not in listed:
            p.unlink()
    atomic_write_bytes(local_dir / MANIFEST_NAME, data)
    report.shards = len(m.shards)
    return report


def _same_local(target: Path, rel: str, digest: str, trusted: dict[str, tuple[str, int]]) -> bool:
    if trusted.get(rel) == (digest, target.stat().st_size):
        return True
    return sha256_file(target) == digest


def _download(src: Place, rel: str, target: Path, digest: str | None) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(TMP_PREFIX + target.name)
    try:
        with_retries(f"downloading {src.name(rel)}", lambda: src.fs.get_file(src.path(rel), str(tmp)))
        if digest is not None and sha256_file(tmp) != digest:
            raise LogitCacheError(
                f"{src.name(rel)}: sha256 differs from the manifest (the object was replaced or damaged); "
                "nothing was overwritten here. Check the source with `logitcache verify`."
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _download_optional(src: Place, rel: str, target: Path) -> None:
    """A file no manifest vouches for (the card): fetched when there, else left alone."""
    try:
        data = with_retries(f"downloading {src.name(rel)}", lambda: src.fs.cat_file(src.path(rel)))
    except LogitCacheError as e:
        if isinstance(e.__cause__, FileNotFoundError):
            return
        raise
    atomic_write_bytes(target, data)


def sync_down(place: Place, local_dir: Path) -> Manifest | None:
    """Before writing ``place`` through ``local_dir``: make the staging agree with the remote.

    The remote is the truth: with a remote manifest, the staging becomes a copy of it (what a
    killed run had staged but not uploaded is dropped, and is redone). Without one, the staging
    is left as it is (a cache the writer made there resumes, and is uploaded whole).
    """
    got = read_manifest(place)
    if got is None:
        return None
    remote_m = got[0]
    trusted: dict[str, tuple[str, int]] = {}
    if (local_dir / MANIFEST_NAME).is_file():
        try:
            local_m = load_manifest(local_dir)
        except LogitCacheError:
            local_m = None  # damaged: replaced by the remote's
        if local_m is not None and local_m.settings_differences(remote_m):
            raise LogitCacheError(
                f"--local-cache {local_dir} holds another cache than {place.url} (made with other settings); "
                "give an empty directory (or none, for the default) to stage this one."
            )
        if local_m is not None:
            trusted = {s.path: (s.sha256, s.bytes) for s in local_m.shards}
    pull(place, local_dir, manifest=got, trusted=trusted)
    return remote_m


# --- push: a local cache to a remote place -------------------------------------------------


class Pusher:
    """Uploads a local cache to ``dest`` as it grows; each :meth:`push` ends with the manifest.

    Shards already uploaded (listed with the same sha256 in the manifest this pusher last saw
    at ``dest``) are not sent again; anything else is, even over an object of the same name (a
    killed run may have left a shard there that no manifest lists). ``check`` runs before every
    object goes up (the lease's: a writer that lost its lease must not overwrite anything).
    """

    def __init__(self, local_dir: Path, dest: Place, *, check: Callable[[], None] | None = None) -> None:
        self.local_dir = local_dir
        self.dest = dest
        self.check = check or (lambda: None)
        got = read_manifest(dest)
        self._sent: dict[str, str] = {rel: d for rel, d in _listed_files(got[0]) if d} if got else {}
        self._card_sent = False

    def push(self, *, final: bool = False) -> SyncReport:
        local_m = load_manifest(self.local_dir)
        report = SyncReport(str(self.local_dir), self.dest.url, shards=len(local_m.shards))
        for rel, digest in _listed_files(local_m):
            if digest is not None and self._sent.get(rel) == digest:
                report.skipped += 1
                continue
            self.check()
            _upload(self.local_dir, rel, self.dest, report)
            self._sent[rel] = digest or ""
            crash_point("upload.shard" if rel.startswith(DATA_DIR + "/") else "upload.tokenizer")
        if final or not self._card_sent:
            if (self.local_dir / CARD_NAME).is_file():
                self.check()
                _upload(self.local_dir, CARD_NAME, self.dest, report)
            self._card_sent = True
        self.check()
        crash_point("upload.manifest")
        _upload(self.local_dir, MANIFEST_NAME, self.dest, report)
        return report


def _upload(local_dir: Path, rel: str, dest: Place, report: SyncReport) -> None:
    source = local_dir / rel
    with_retries(f"uploading {dest.name(rel)}", lambda: _put(dest, source, rel))
    report.copied += 1
    report.bytes += source.stat().st_size
    report.files.append(rel)


def _put(dest: Place, source: Path, rel: str) -> None:
    if dest.local:  # through a temp name: a local reader sees the old file or the new one
        target = Path(dest.path(rel))
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(TMP_PREFIX + target.name)
        dest.fs.put_file(str(source), str(tmp))
        os.replace(tmp, target)
    else:  # an object store's PUT replaces the object whole
        dest.fs.put_file(str(source), dest.path(rel))


def push(local_dir: Path, dest: Place, *, on_file: OnFile = _nothing, report: SyncReport | None = None) -> SyncReport:
    """Upload the local cache ``local_dir`` to ``dest``, checked and resumable, manifest last.

    Every listed file is first checked against the manifest's sha256 (a damaged local cache is
    never published). An object already at ``dest`` with the same size is skipped (a rerun of an
    interrupted push sends only the rest); a local ``dest`` is checked by sha256 instead.
    """
    m = load_manifest(local_dir)
    report = report or SyncReport(str(local_dir), dest.url)
    files = _listed_files(m)
    sizes = _sizes(dest)
    for i, (rel, digest) in enumerate(files):
        source = local_dir / rel
        if not source.is_file():
            raise LogitCacheError(f"{source}: missing, although the manifest lists it; the cache is damaged (`logitcache verify {local_dir}`).")
        if digest is not None and sha256_file(source) != digest:
            raise LogitCacheError(f"{source}: sha256 differs from the manifest; the cache is damaged, nothing of it was sent (`logitcache verify {local_dir}`).")
        if _already_there(dest, rel, source, digest, sizes):
            report.skipped += 1
        else:
            _upload(local_dir, rel, dest, report)
            crash_point("upload.shard" if rel.startswith(DATA_DIR + "/") else "upload.tokenizer")
        on_file("uploading", i + 1, len(files))
    if (local_dir / CARD_NAME).is_file():
        _upload(local_dir, CARD_NAME, dest, report)
    crash_point("upload.manifest")
    _upload(local_dir, MANIFEST_NAME, dest, report)
    report.shards = len(m.shards)
    return report


def _sizes(dest: Place) -> dict[str, int]:
    """Size of every object under ``dest`` by path relative to it (one listing, not one HEAD each)."""
    if dest.local:
        return {}
    dest.fs.invalidate_cache()

    def listing() -> dict:
        try:
            return dest.fs.find(dest.root, detail=True)
        except FileNotFoundError:
            return {}

    found = with_retries(f"listing {dest.url}", listing)
    prefix = dest.root.rstrip("/") + "/"
    return {path[len(prefix):]: int(info.get("size") or 0) for path, info in found.items() if path.startswith(prefix)}


def _already_there(dest: Place, rel: str, source: Path, digest: str | None, sizes: dict[str, int]) -> bool:
    if dest.local:
        target = Path(dest.path(rel))
        return target.is_file() and digest is not None and sha256_file(target) == digest
    return sizes.get(rel) == source.stat().st_size


# --- copy: any cache to any place ----------------------------------------------------------


def copy_cache(src: str, dst: str, *, staging: str | os.PathLike | None = None,
               on_file: OnFile = _nothing) -> SyncReport:
    """Copy the cache at ``src`` to ``dst`` (plain paths or URLs, in any combination).

    Verified: every shard and tokenizer file is checked against the manifest's sha256, on the
    bytes that arrive (a download) or before they leave (an upload). Resumable: a rerun skips what
    is already at ``dst``. The manifest is written last. Remote to remote goes through a local
    staging directory (``staging``, else :func:`default_staging` of ``src``).
    """
    source = remote_place(src) if is_url(src) else Place.of(src)
    got = read_manifest(source)
    if got is None:
        raise LogitCacheError(f"{src}: no {MANIFEST_NAME} there, so it is not a logitcache cache; point to one.")
    report = SyncReport(src, dst)
    if not is_url(dst):
        local = Path(local_path(dst)).expanduser()
        _check_local_dest(local, got[0], src)
        pull(source, local, on_file=on_file, report=report, manifest=got)
        (local / COPY_MARKER).unlink(missing_ok=True)
        return report
    dest = remote_place(dst)
    with Lease(dst, purpose="copying into"):
        _check_remote_dest(dest, got[0], src)
        if source.local:
            return push(Path(source.root), dest, on_file=on_file, report=report)
        stage = staging_dir(src, staging)
        pull(source, stage, on_file=on_file, manifest=got)
        return push(stage, dest, on_file=on_file, report=report)


def _check_local_dest(local: Path, m: Manifest, src: str) -> None:
    """A local DST may be new, empty, an interrupted copy, or an older copy of the same cache."""
    if local.exists() and not local.is_dir():
        raise LogitCacheError(f"{local} is a file; give a new or empty directory for the copy.")
    if (local / MANIFEST_NAME).is_file():
        if load_manifest(local).settings_differences(m):
            raise LogitCacheError(f"{local} holds another cache than {src}; give a new or empty directory for the copy.")
        return
    if local.exists() and any(local.iterdir()) and not (local / COPY_MARKER).exists():
        raise LogitCacheError(
            f"{local} is not empty and holds no cache; give a new or empty directory so nothing there is overwritten."
        )
    local.mkdir(parents=True, exist_ok=True)
    if not (local / COPY_MARKER).exists():
        write_marker(local, COPY_MARKER, layout_names())


def _check_remote_dest(dest: Place, m: Manifest, src: str) -> None:
    got = read_manifest(dest)
    if got is not None and got[0].settings_differences(m):
        raise LogitCacheError(f"{dest.url} holds another cache than {src}; give a new or empty location for the copy.")



# --- merge and convert with URLs: inputs pulled into the staging, the output pushed ---------------


def staged_inputs(paths: list[str], staging: Path) -> list[str]:
    """``paths`` with every URL replaced by a verified local copy under ``staging/inputs``.

    A URL holding a cache is pulled whole; one holding the ``part-*`` caches of a split teacher
    run (its ``--out``) has each part pulled, and gives their parent directory (what merge takes).
    """
    out = []
    for i, text in enumerate(paths):
        if not is_url(text):
            out.append(local_path(text))
            continue
        place = remote_place(text)
        local = staging / "inputs" / f"{i}-{Path(place.root).name}"
        got = read_manifest(place)
        if got is not None:
            pull(place, local, manifest=got)
        else:
            names = _part_names(place)
            if not names:
                raise LogitCacheError(f"{text}: no {MANIFEST_NAME} and no {PART_GLOB} caches there; point to a cache or to a split run's --out.")
            for name in names:
                pull(Place(place.name(name), place.fs, place.path(name), False), local / name)
        out.append(str(local))
    return out


def _part_names(place: Place) -> list[str]:
    place.fs.invalidate_cache()
    try:
        entries = with_retries(f"listing {place.url}", lambda: place.fs.ls(place.root, detail=False))
    except LogitCacheError as e:
        if isinstance(e.__cause__, FileNotFoundError):
            return []
        raise
    return sorted(name for name in (e.rstrip("/").rsplit("/", 1)[-1] for e in entries) if part_name_ok(name))


@contextlib.contextmanager
def written_through(out: str, staging: Path, *, purpose: str, new_only: bool = False) -> Iterator[Path]:
    """The local directory a command writes for the output ``out``: ``out`` itself when local.

    For a URL: ``staging/out``, first made to agree with the remote (a partial convert resumes
    from it), then pushed when the command succeeds, manifest last; all under the remote's lease.
    ``new_only``: a remote that already holds a cache is refused (merge never adds to one).
    """
    if not is_url(out):
        yield Path(local_path(out))
        return
    place = remote_place(out)
    with Lease(out, purpose=purpose) as lease:
        local = staging / "out"
        if new_only and read_manifest(place) is not None:
            raise LogitCacheError(f"{out} already holds a cache; give a new or empty location (nothing there was changed).")
        sync_down(place, local)
        yield local
        lease.check()
        push(local, place)


def merge_through(out: str, parts: list[str], local_cache: str | os.PathLike | None = None, *, link: bool = True,
                  verify: bool = True, on_shard: Callable[[str, int, int], None] | None = None) -> MergeReport | None:
    """``merge_caches`` where ``out`` and ``parts`` may be URLs (`logitcache merge`, `teacher --ray`).

    Remote parts are pulled into the staging and checked; a remote ``out`` is written there and
    pushed, manifest last, under its lease. Returns the MergeReport (``out`` as given), or None
    where a merge staged before was complete and only its upload had stopped: it is uploaded now.
    """
    from logitcache.storage.merge import expand_parts, merge_caches

    urls = [p for p in [out, *parts] if is_url(p)]
    staging = staging_dir(urls[0], local_cache) if urls else Path()
    local_parts = staged_inputs(parts, staging)
    with written_through(out, staging, purpose="merging into", new_only=True) as local_out:
        if is_url(out) and (local_out / MANIFEST_NAME).is_file() and load_manifest(local_out).status == "complete":
            return None
        report = merge_caches(local_out, expand_parts([Path(p) for p in local_parts]), link=link, verify=verify,
                              on_shard=on_shard)
    report.out = out  # as given: a URL, not its staging copy
    return report
