"""Stage 1 on a Ray cluster: one Ray task per part of a split run, retried on failure, then the merge.

    run_on_ray(TeacherConfig(model=..., data=..., out="/shared/cache"), RayOptions(num_parts=64, gpus_per_part=1))

Task i runs ``run_teacher`` for part i of n exactly as a Slurm array task does
(``--num-parts n --part-index i``): it writes ``PARTS/part-0000i-of-0000n`` (PARTS is
``OUT-parts``) and, run again, resumes it. A task that fails (its worker killed, out of memory,
a lost node, an error in the teacher) is submitted again, up to ``part_retries`` times, and
resumes its part, so nothing is written twice; an error the user must fix (a LogitCacheError:
bad data, a bad flag) stops every part at once, since each would fail the same way. Once every
part is complete, they are merged into ``out`` on the driver. One part (n = 1) writes ``out``
itself and needs no merge.

Retries are the driver's, not Ray's (``max_retries=0``): the driver can then print a line for
each, and tell an error worth retrying from one that is not.

Fault injection for tests: with ``LOGITCACHE_RAY_CRASH=<part>:<spec>`` in the driver's
environment, the first attempt of part ``<part>`` (0-based) runs with
``LOGITCACHE_CRASH_AT=<spec>`` (storage/fsutil.py): ``1:shard.listed:1`` SIGKILLs the worker of
part index 1 (part 2 of n) once its manifest lists its first shard; the retry runs without it.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

from logitcache.errors import LogitCacheError
from logitcache.pipeline.progress import clock, is_terminal
from logitcache.pipeline.teacher.run import TeacherConfig, _resolved_if_local, run_teacher
from logitcache.storage.fsutil import CRASH_ENV
from logitcache.storage.merge import MergeReport
from logitcache.storage.parts import part_name
from logitcache.storage.remote import is_url, local_path
from logitcache.storage.sync import merge_through, read_manifest, remote_place

RAY_CRASH_ENV = "LOGITCACHE_RAY_CRASH"
INSTALL_RAY = "pip install 'logitcache[ray]'"


@dataclass
class RayOptions:
    """How stage 1 is spread over Ray (``logitcache teacher --ray``)."""

    num_parts: int
    # None: Ray's own default (RAY_ADDRESS, else a Ray instance running on this machine, else
    # a new one); "auto": the running cluster, refused if there is none; "local": always a new
    # instance on this machine; or "ray://HEAD:10001", "HEAD:6379".
    address: str | None = None
    # None: --tensor-parallel-size with vllm (one vLLM per part), 0 with hf (CPU). Ray gives each
    # task that many GPUs of its own and sets CUDA_VISIBLE_DEVICES to them.
    gpus_per_part: float | None = None
    cpus_per_part: float = 1.0
    part_retries: int = 3  # further attempts of a failed part, each resuming it

    def validate(self, cfg: TeacherConfig) -> None:
        if self.num_parts < 1:
            raise LogitCacheError(f"--num-parts must be at least 1 (got {self.num_parts}); with --ray, one Ray task per part.")
        if self.part_retries < 0:
            raise LogitCacheError(f"--part-retries must be 0 or more (got {self.part_retries}); 3 is the default.")
        if not self.cpus_per_part > 0:
            raise LogitCacheError(f"--cpus-per-part must be positive (got {self.cpus_per_part}).")
        gpus = self.gpus(cfg)
        if not gpus >= 0:
            raise LogitCacheError(f"--gpus-per-part must be 0 or more (got {gpus}).")
        if cfg.engine == "vllm" and gpus < cfg.tensor_parallel_size:
            raise LogitCacheError(
                f"--gpus-per-part {gpus:g} is fewer than vLLM's --tensor-parallel-size {cfg.tensor_parallel_size}: "
                f"give each part --gpus-per-part {cfg.tensor_parallel_size}."
            )
        if cfg.limit is not None and self.num_parts > 1:
            raise LogitCacheError(
                f"--limit leaves every part partial, and the merge joins only complete parts; leave it out with --ray "
                f"--num-parts {self.num_parts}, or try the data first with --num-parts 1 --limit {cfg.limit}."
            )
        if cfg.engine == "hf" and gpus > 1:
            raise LogitCacheError(
                f"--gpus-per-part {gpus:g}: the hf engine uses one GPU per part; give --gpus-per-part 1 "
                "(or a fraction to share a GPU), and more parts for more GPUs."
            )

    def gpus(self, cfg: TeacherConfig) -> float:
        if self.gpus_per_part is not None:
            return self.gpus_per_part
        return cfg.tensor_parallel_size if cfg.engine == "vllm" else 0


@dataclass
class PartRun:
    """What the task of one part did, as the driver saw it."""

    index: int
    attempts: int = 0
    failures: list[str] = field(default_factory=list)  # why each failed attempt failed
    written: int = 0  # examples written by the attempt that finished
    already_done: int = 0  # examples it found in the part (from earlier attempts or runs)
    tokens: int = 0
    seconds: float = 0.0
    node: str = ""


@dataclass
class RayRunResult:
    out: str
    parts_dir: str | None  # None: one part, written to out itself
    parts: list[PartRun]
    seconds: float = 0.0
    merge: MergeReport | None = None  # None for one part

    @property
    def retries(self) -> int:
        return sum(p.attempts - 1 for p in self.parts)


def parts_dir_for(out: str) -> str:
    """Where the parts of ``out`` are written: beside it, ``OUT-parts`` (a URL stays a URL)."""
    return out.rstrip("/") + "-parts"


def import_ray():
    """The ray module, or one line naming the extra that installs it."""
    # Read by Ray when imported, for the tasks' lines it forwards to the driver. Ray would merge
    # lines of one pattern from several workers ("[repeated 3x across cluster]"), but each part's
    # progress line is news of its own; and colour codes only clutter a log file.
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if not is_terminal(sys.stderr):
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    try:
        import ray
    except ImportError:
        raise LogitCacheError(f"--ray needs the ray package; {INSTALL_RAY}.") from None
    return ray


def run_on_ray(cfg: TeacherConfig, opts: RayOptions, *, log: Callable[[str], None] | None = None,
               on_merge: Callable[[str, int, int], None] | None = None) -> RayRunResult:
    """Write the cache ``cfg.out`` with ``opts.num_parts`` Ray tasks, then merge their parts.

    ``cfg.num_workers`` and ``cfg.worker_index`` are set per task. ``log`` gets a line per part
    submitted, finished, failed and retried (default: stderr); ``on_merge`` is merge_caches'
    ``on_shard``. Raises LogitCacheError in one line when a part fails for good or the merge
    refuses; finished shards are kept, and the same call resumes every part.
    """
    log = log or _stderr
    opts.validate(cfg)
    cfg = _for_every_node(cfg)
    n = opts.num_parts
    parts_dir = parts_dir_for(cfg.out) if n > 1 else None
    for i in range(n):  # bad settings fail here, in a second, not in every task after Ray starts
        _part_config(cfg, i, n, parts_dir).validate()
    _check_out(cfg.out, merged=n > 1)
    ray = import_ray()
    crash = _crash_spec(n)
    start = time.perf_counter()
    if ray.is_initialized():  # called from a Ray program: its session, its signal handlers
        runs = _run_parts(ray, cfg, opts, parts_dir, crash, log, start)
    else:
        with _ray_session(ray, opts.address):
            runs = _run_parts(ray, cfg, opts, parts_dir, crash, log, start)
    result = RayRunResult(out=cfg.out, parts_dir=parts_dir, parts=runs)
    if parts_dir is not None:
        log(f"[{clock(time.perf_counter() - start)}] merging {n} parts from {parts_dir} into {cfg.out}")
        # The n parts of this run by name: a part-* left in PARTS by a run with another N is no part of it.
        parts = [f"{parts_dir}/{part_name(i, n)}" for i in range(n)]
        result.merge = merge_through(cfg.out, parts, cfg.local_cache, on_shard=on_merge)
    result.seconds = time.perf_counter() - start
    return result


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _for_every_node(cfg: TeacherConfig) -> TeacherConfig:
    # Workers may start in another directory than the driver (a job's working dir): local
    # paths are made absolute here. They must still be on storage every node reaches.
    out = cfg.out if is_url(cfg.out) else _absolute(cfg.out)
    staging = None if cfg.local_cache is None else _absolute(cfg.local_cache)
    return replace(cfg, model=_resolved_if_local(cfg.model), data=_resolved_if_local(cfg.data), out=out,
                   local_cache=staging)


def _absolute(path: str) -> str:
    return str(Path(local_path(path)).expanduser().absolute())


def _part_config(cfg: TeacherConfig, index: int, count: int, parts_dir: str | None) -> TeacherConfig:
    if parts_dir is None:
        return replace(cfg, num_workers=1, worker_index=0)
    return replace(cfg, out=parts_dir, num_workers=count, worker_index=index)


def _check_out(out: str, merged: bool) -> None:
    """Refuse, before any work, an --out that the merge would refuse at the end."""
    if not merged:
        return  # one part writes out itself: run_teacher resumes or refuses it as a plain run does
    if is_url(out):  # the protocol, bucket and credentials checked too: one line, before Ray starts
        taken = read_manifest(remote_place(out)) is not None
    else:
        path = Path(out)
        taken = path.is_file() or (path.is_dir() and any(path.iterdir()))
    if taken:
        raise LogitCacheError(
            f"--out {out} is not empty (or holds a cache already); with --ray and several parts it is the merged "
            f"cache, written last: give a new or empty --out (the parts go to {parts_dir_for(out)} and are kept)."
        )


def _crash_spec(n: int) -> tuple[int, str] | None:
    spec = os.environ.get(RAY_CRASH_ENV)
    if not spec:
        return None
    part, _, crash = spec.partition(":")
    if not part.isdigit() or not crash or int(part) >= n:
        raise LogitCacheError(f"{RAY_CRASH_ENV}={spec!r}: give PART:POINT:N with PART below {n}, e.g. 1:shard.listed:1.")
    return int(part), crash


@contextmanager
def _ray_session(ray, address: str | None) -> Iterator[None]:
    """Ray started (or joined) for the run, and shut down after it, SIGTERM kept as it was.

    ray.init takes SIGTERM over (in Python, and in its C++ core, which aborts the process), and
    an exception a handler raises inside a Ray call comes out as KeyboardInterrupt: the handler in
    force before (the CLI's: stop as Ctrl-C does, exit 143) is put back, and what it raises is raised.
    """
    before = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    seen: list[int] = []

    def on_sigterm(signum, frame) -> None:
        seen.append(signum)
        before(signum, frame)

    try:
        _init(ray, address)
    finally:
        if before is not None:
            signal.signal(signal.SIGTERM, on_sigterm if callable(before) else before)
    try:
        yield
    except KeyboardInterrupt:
        if seen:
            before(signal.SIGTERM, None)  # raises the handler's own exception
        raise
    finally:
        ray.shutdown()
        if before is not None and not seen:
            signal.signal(signal.SIGTERM, before)


def _init(ray, address: str | None) -> None:
    kwargs: dict[str, Any] = {"log_to_driver": True}
    if address == "local":
        kwargs["include_dashboard"] = False  # a throwaway instance: nothing to look at, seconds to save
    try:
        ray.init(address=address, **kwargs)
    except ConnectionError as e:
        said = " ".join(str(e).split()).split(". ")[0][:200]  # Ray's advice goes on to name its own flags
        raise LogitCacheError(
            f"--ray-address {address}: no Ray cluster to connect to ({said}); "
            "start one (`ray start --head`), give its address, or leave --ray-address out to start one here."
        ) from None


def _run_parts(ray, cfg: TeacherConfig, opts: RayOptions, parts_dir: str | None, crash, log, start: float) -> list[PartRun]:
    n = opts.num_parts
    gpus = opts.gpus(cfg)
    if cfg.engine == "hf" and gpus == 0 and cfg.device == "auto":
        # No GPU reserved for the task: one that a node has must stay free for the parts that reserved it.
        cfg = replace(cfg, device="cpu")
    task = ray.remote(_run_part)
    runs = [PartRun(i) for i in range(n)]
    pending: dict[Any, int] = {}  # the task of each running part: a generator of its events

    def submit(i: int) -> None:
        runs[i].attempts += 1
        spec = crash[1] if crash is not None and crash[0] == i and runs[i].attempts == 1 else None
        # Streaming: the task reports its start (node, GPUs) before its result, so the driver can say it.
        events = task.options(name=part_name(i, n), num_cpus=opts.cpus_per_part, num_gpus=gpus, max_retries=0,
                              num_returns="streaming").remote(_part_config(cfg, i, n, parts_dir), spec)
        pending[events] = i

    def say(i: int, what: str) -> None:
        log(f"[{clock(time.perf_counter() - start)}] part {i + 1} of {n}: {what}")

    for i in range(n):
        submit(i)
    log(f"[{clock(time.perf_counter() - start)}] submitted {n} parts to Ray (each: CPUs {opts.cpus_per_part:g}, "
        f"GPUs {gpus:g}, retries {opts.part_retries}); parts in {parts_dir or cfg.out}")
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            i = pending[ready[0]]
            run = runs[i]
            try:
                event = ray.get(next(ready[0]))
            except ray.exceptions.RayTaskError as e:
                if isinstance(e.cause, LogitCacheError):  # every part would fail the same way
                    raise LogitCacheError(f"part {i + 1} of {n}: {e.cause}") from None
                why = _short(e.cause if e.cause is not None else e)
            except ray.exceptions.RayError as e:  # the worker or its node died, or Ray lost the task
                why = _short(e)
            else:
                if event[0] == "started":
                    run.node, pid, on = event[1:]
                    say(i, f"started on {run.node} (pid {pid}, GPUs {on}, attempt {run.attempts})")
                else:
                    del pending[ready[0]]
                    run.written, run.already_done, run.tokens, run.seconds = event[1:]
                    say(i, f"finished on {run.node}: {run.written} examples written, {run.already_done} already "
                           f"there, {run.tokens:,} tokens in {run.seconds:.1f}s (attempt {run.attempts})")
                continue
            del pending[ready[0]]
            run.failures.append(why)
            if run.attempts > opts.part_retries:
                raise LogitCacheError(
                    f"part {i + 1} of {n} failed {_times(run.attempts)} (last: {why}); finished shards are kept in "
                    f"{parts_dir or cfg.out}: rerun the same command to resume (or raise --part-retries)."
                )
            say(i, f"attempt {run.attempts} failed ({why}); retrying, it resumes its part "
                   f"(attempt {run.attempts + 1} of {opts.part_retries + 1})")
            submit(i)
    except BaseException:
        for events in pending:  # as Ctrl-C in each: the parts keep what they finished
            ray.cancel(events)
        raise
    return runs


def _run_part(cfg: TeacherConfig, crash: str | None) -> Iterator[tuple]:
    """One Ray task, on a worker: its part, as a Slurm array task runs it. Yields ("started",
    node, pid, GPUs) and then ("finished", examples written, already there, tokens, seconds)."""
    import ray

    yield "started", socket.gethostname(), os.getpid(), ",".join(str(g) for g in ray.get_gpu_ids()) or "none"
    if crash is not None:
        os.environ[CRASH_ENV] = crash
    try:
        r = run_teacher(cfg, progress=False)
    finally:  # Ray reuses the worker for other tasks
        if crash is not None:
            os.environ.pop(CRASH_ENV, None)
    yield "finished", r.written, r.already_done, r.tokens, r.seconds


def _times(n: int) -> str:
    return "once" if n == 1 else f"{n} times"


def _short(e: BaseException, limit: int = 160) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    # Ray's messages open with a paragraph about the worker; the first sentence says what happened.
    text = text.split(" Traceback ")[0]
    return f"{type(e).__name__}: {text if len(text) <= limit else text[: limit - 3] + '...'}"
