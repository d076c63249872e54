"""Stage 5: segments -> artifacts, in parallel worker processes, with a timeout.

Each segment compiles in a separate (spawned) process so that a compiler
that crashes or hangs costs only its segment: the worker is killed and the
segment goes back to TensorFlow (unless --must-compile).

A worker imports its backends before its first job (OpenVINO: 0.3 s; XLA, which
needs TensorFlow: 3 s), so healthy idle workers are kept for the next compile in
this process (placement then the final compile, or a script compiling many
models) and the first one is started when compile() starts, its imports
overlapping loading and Grappler. Idle workers exit after _IDLE_S, and at
interpreter exit.

Before an artifact is accepted it is run on check inputs and its outputs are
compared with TensorFlow's on the same inputs, which this process computes while
the worker compiles: a compiler that returns garbage costs its segment (which
stays in TF), never a silently wrong model.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import subprocess
import sys
import threading
import time
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path

import numpy as np

from fuseflow import COMPILER_PROCESS, progress
from fuseflow.backends.base import Artifact, SegmentGraph, random_inputs, relative_error
from fuseflow.cache import CompileCache, values_digest
from fuseflow.options import CompilerOptions

log = logging.getLogger("fuseflow")

_MEMORY_PER_WORKER = 4 << 30  # the reference's rule: one worker per 4 GB available
_STARTUP_S = 300.0  # a worker that can't even import TF in this long is stuck
_IDLE_S = 120.0  # an idle worker kept longer than this exits
_MAX_JOBS = 64  # then a worker is replaced: TF state grows with every segment it traces
# Environment a worker does not read: a test's or a compile's changes to these don't make
# a started worker stale.
_ENV_IGNORED = frozenset({"PYTEST_CURRENT_TEST", "FUSEFLOW_CACHE_DIR"})
# In each segment's directory (compile_worker.py): the GraphDef the parent writes for the
# worker, and the executable the worker writes back.
SEGMENT_FILE = "graph.pb"
EXECUTABLE_FILE = "executable.bin"


@dataclass(frozen=True)
class CompileJob:
    """One segment for one backend; directory (under the workdir) keeps its files."""

    backend: str
    segment: SegmentGraph
    directory: str
    options: CompilerOptions | None = None  # its own (int8's bf16 alternative), else the call's


@dataclass(frozen=True)
class CompiledSegment:
    segment: SegmentGraph
    artifact: Artifact | None  # None: failed, the segment stays in TF
    error: str | None
    seconds: float
    backend: str = ""
    cached: bool = False  # the artifact came from the compile cache
    options: CompilerOptions | None = None  # set when this segment was compiled with its own
    # The workdir's files that hold artifact.executable and segment.graph_def_bytes (the
    # timing process reads them; a segment taken from the cache has no such GraphDef file).
    executable_file: Path | None = None
    segment_file: Path | None = None


def worker_count(options: CompilerOptions, jobs: int) -> int:
    if options.workers:
        return max(1, min(options.workers, jobs))
    try:
        pages = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        pages = _MEMORY_PER_WORKER
    return max(1, min(os.cpu_count() or 1, pages // _MEMORY_PER_WORKER, jobs))


class _Worker:
    """A compiler process: `python -m fuseflow.compile_worker`, spoken to over a pipe.

    A fresh interpreter (not multiprocessing's spawn) so that the user's
    __main__ is never re-imported and TF/OpenVINO state is never forked.
    Each job names its backend: one worker serves every backend; the backends
    named here are imported before the first job arrives.
    """

    def __init__(self, backends: tuple[str, ...] = ()):
        self.env = _env_key()
        self.jobs_done = 0
        self.idle_since = time.monotonic()
        parent_r, child_w = os.pipe()
        child_r, parent_w = os.pipe()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "fuseflow.compile_worker", str(child_r), str(child_w),
             *backends], pass_fds=(child_r, child_w), stdin=subprocess.DEVNULL,
            env={**os.environ, COMPILER_PROCESS: "1"})  # it imports no TensorFlow
        os.close(child_r)
        os.close(child_w)
        self.reader = Connection(parent_r, writable=False)
        self.writer = Connection(parent_w, readable=False)
        self.job: tuple[int, float] | None = None  # (segment index, start time)
        self.started = False  # the current job was acknowledged

    def reusable(self) -> bool:
        """Alive, idle, started with this environment, not worn out."""
        return (self.job is None and self.process.poll() is None and self.env == _env_key()
                and self.jobs_done < _MAX_JOBS)

    def stop(self, kill: bool = False) -> None:
        if kill and self.process.poll() is None:
            self.process.kill()
        self.writer.close()
        self.reader.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _env_key() -> frozenset:
    return frozenset((k, v) for k, v in os.environ.items() if k not in _ENV_IGNORED)


class _Pool:
    """Idle workers of this process, for the next compile_segments."""

    def __init__(self) -> None:
        self._idle: list[_Worker] = []
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None

    def take(self, count: int, backends: tuple[str, ...] = ()) -> list[_Worker]:
        """count workers: idle ones first, then new ones (importing `backends` at once)."""
        with self._lock:
            keep = [w for w in self._idle if w.reusable()]
            for w in self._idle:
                if w not in keep:
                    w.stop(kill=True)
            taken, self._idle = keep[:count], keep[count:]
        return taken + [_Worker(backends) for _ in range(count - len(taken))]

    def give(self, workers: list[_Worker]) -> None:
        now = time.monotonic()
        with self._lock:
            for w in workers:
                if w.reusable():
                    w.idle_since = now
                    self._idle.append(w)
                else:
                    w.stop(kill=True)
            if self._timer is None and self._idle:
                self._timer = threading.Timer(_IDLE_S, self._expire)
                self._timer.daemon = True
                self._timer.start()

    def prestart(self, backends: tuple[str, ...]) -> None:
        """One worker starting now, unless one is idle already."""
        with self._lock:
            if any(w.reusable() for w in self._idle):
                return
        self.give([_Worker(backends)])

    def preload(self, backends: tuple[str, ...]) -> None:
        """Idle workers import these backends now, in the background (see compile_worker)."""
        with self._lock:
            for w in self._idle:
                if w.reusable():
                    try:
                        w.writer.send(("preload", backends))
                    except OSError:  # a dead worker is dropped when next taken
                        pass

    def _expire(self) -> None:
        now = time.monotonic()
        with self._lock:
            self._timer = None
            old = [w for w in self._idle if now - w.idle_since >= _IDLE_S]
            self._idle = [w for w in self._idle if w not in old]
            if self._idle:
                wait = max(1.0, _IDLE_S - (now - min(w.idle_since for w in self._idle)))
                self._timer = threading.Timer(wait, self._expire)
                self._timer.daemon = True
                self._timer.start()
        for w in old:
            w.stop(kill=True)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
        for w in idle:
            w.stop(kill=True)


_POOL = _Pool()
atexit.register(_POOL.close)


def prestart_worker(backends: list[str]) -> None:
    """Start a compiler process now, importing `backends`, so that its imports overlap
    the caller's own work (loading, Grappler)."""
    _POOL.prestart(tuple(backends))


def call_in_worker(function: str, args: tuple, backends: tuple[str, ...],
                   timeout_s: float):
    """function(*args) ("module:name") in a compiler process with `backends` imported
    (the one compile() started, usually): a library that aborts on some graph costs that
    process, never the user's. RuntimeError when it fails, dies or times out."""
    [worker] = _POOL.take(1, backends)
    try:
        worker.writer.send(("call", function, args))
        if not worker.reader.poll(timeout_s):
            worker.stop(kill=True)
            raise RuntimeError(f"no answer in {timeout_s:g} s")
        message = worker.reader.recv()
    except (EOFError, OSError):
        raise RuntimeError(f"its process died (exit code {worker.process.wait()})") from None
    finally:
        _POOL.give([worker])  # a dead or killed one is stopped, not kept
    if message[0] != "ok":
        raise RuntimeError(message[1][0])
    return message[1]


def preload_backends(backends: list[str]) -> None:
    """The started compiler processes import `backends` too, once a compile knows it
    needs them (XLA's TensorFlow, for the loops placed on it)."""
    _POOL.preload(tuple(backends))


def compile_segments(jobs: list[CompileJob], options: CompilerOptions, workdir: Path,
                     keys: list[str] | None = None) -> list[CompiledSegment]:
    """Compile every job; failures and timeouts come back as errors, not raises.
    Jobs in the compile cache are taken from it and not compiled. keys: the jobs' cache
    keys when the caller has them already (cache_keys)."""
    segments = [j.segment for j in jobs]
    if len({j.directory for j in jobs}) != len(jobs):  # a worker reads its job's files there
        raise ValueError(f"compile jobs share a directory: {[j.directory for j in jobs]}")
    cache = CompileCache.for_options(options)
    keys = keys or cache_keys(jobs, options, workdir)
    results: dict[int, CompiledSegment] = {}
    for i, job in enumerate(jobs):
        start = time.monotonic()
        artifact = cache.lookup(keys[i])
        if artifact is not None:
            results[i] = _record(job, workdir / job.directory, ("ok", artifact),
                                 time.monotonic() - start, len(results) + 1, len(segments),
                                 cached=True)
    pending = [i for i in range(len(jobs)) if i not in results]
    backends = tuple(sorted({jobs[i].backend for i in pending}))
    workers = _POOL.take(worker_count(options, len(pending)), backends) if pending else []
    # TF's answers on each job's check inputs, computed here while its worker compiles.
    references: dict[int, tuple[Future, str]] = {}
    checker = ThreadPoolExecutor(1, thread_name_prefix="fuseflow-reference")
    progress.update(len(results), len(segments), "")
    try:
        while len(results) < len(segments):
            for w in workers:
                if w.job is None and pending:
                    i = pending.pop(0)
                    seg_dir = workdir / jobs[i].directory
                    seg_dir.mkdir(parents=True, exist_ok=True)
                    (seg_dir / SEGMENT_FILE).write_bytes(segments[i].graph_def_bytes)
                    inputs, where = check_inputs(segments[i], jobs[i].options or options,
                                                 seg_dir)
                    # The worker reads the GraphDef from the file (compile_worker.py).
                    w.writer.send(("job", jobs[i].backend,
                                   dataclasses.replace(segments[i], graph_def_bytes=b""),
                                   jobs[i].options or options, str(seg_dir), inputs))
                    w.job = (i, time.monotonic())
                    references[i] = (checker.submit(reference_outputs, segments[i],
                                                    inputs), where)
            for k, w in enumerate(workers):
                outcome = _poll(w, options.timeout_s)
                if outcome is None:
                    continue
                i, start = w.job
                w.job, w.started = None, False
                w.jobs_done += 1
                if outcome[0] == "ok":
                    outcome = _checked(jobs[i], outcome, references.pop(i), options,
                                       workdir / jobs[i].directory)
                results[i] = _record(jobs[i], workdir / jobs[i].directory, outcome,
                                     time.monotonic() - start, len(results) + 1, len(segments),
                                     written=True)
                if outcome[0] == "ok":
                    cache.store(keys[i], outcome[1])
                progress.update(len(results), len(segments), segments[i].name)
                if outcome[0] != "ok" and ("timed out" in outcome[1][0]
                                           or w.process.poll() is not None):
                    w.stop(kill=True)  # a hung or dead compiler is replaced, not reused
                    workers[k] = _Worker(backends)
            _wait_any(workers)
    finally:
        checker.shutdown(wait=False, cancel_futures=True)  # a failed compile's check
        _POOL.give(workers)  # busy ones (an interrupted compile) are stopped
    return [results[i] for i in range(len(segments))]


def check_inputs(segment: SegmentGraph, options: CompilerOptions, seg_dir: Path
                 ) -> tuple[list[np.ndarray], str]:
    """The inputs an artifact is checked on, and what they are. A quantized segment is
    checked on its first calibration batch: random inputs fall outside the calibrated
    ranges, where int8 is wrong by design."""
    if options.quantize == "int8":
        from fuseflow.quantize import read_calibration

        batches = read_calibration(seg_dir)
        if batches:
            return batches[0], "calibration inputs"
    return random_inputs(segment), "random inputs"


def reference_outputs(segment: SegmentGraph, inputs: list[np.ndarray]) -> list[np.ndarray]:
    """TF's outputs of the segment on inputs."""
    from fuseflow.batch import run_feeds
    from fuseflow.tf_compat import tf

    return run_feeds(tf.compat.v1.GraphDef.FromString(segment.graph_def_bytes), [],
                     [{f"{p.name}:0": v for p, v in zip(segment.inputs, inputs)}],
                     [p.name for p in segment.outputs])[0]


def compare(segment: SegmentGraph, expected: list, actual: list, tolerance: float,
            where: str) -> str:
    """The check's line for the log; ValueError where an output differs from TF's."""
    worst = 0.0
    for port, want, got in zip(segment.outputs, expected, actual):
        want, got = np.asarray(want), np.asarray(got)
        if want.shape != got.shape:
            raise ValueError(f"output {port.name} has shape {got.shape}, TF gives {want.shape}")
        error = relative_error(want, got)
        if error == float("inf"):
            raise ValueError(f"output {port.name}: non-finite values differ from TF")
        if error > tolerance:
            raise ValueError(f"output {port.name} differs from TF by {error:.2e} (relative; "
                             f"tolerance {tolerance:.0e})")
        worst = max(worst, error)
    return f"verified against TF on {where}: max relative error {worst:.2e}\n"


def _checked(job: CompileJob, outcome: tuple, reference: tuple[Future, str],
             options: CompilerOptions, seg_dir: Path) -> tuple:
    """A worker's ("ok", artifact, its outputs) as ("ok", artifact with its executable
    and the check in its log) if the outputs match TF's, else as ("error", ...).
    reference: TF's outputs to come, and what inputs they are on."""
    from fuseflow.backends import get_backend

    _, artifact, actual = outcome
    expected, where = reference
    try:
        tolerance = get_backend(job.backend).tolerance(job.options or options)
        line = compare(job.segment, expected.result(), actual, tolerance, where)
    except Exception as e:  # noqa: BLE001 - the segment stays in TF, with why
        return ("error", failure(e))
    return ("ok", dataclasses.replace(artifact, log=artifact.log + line,
                                      executable=(seg_dir / EXECUTABLE_FILE).read_bytes()))


def failure(e: Exception) -> tuple[str, str]:
    """An exception as a failed job's (first line, traceback), as the log shows it."""
    text = str(e).strip()
    return (f"{type(e).__name__}: {text.splitlines()[0] if text else ''}",
            traceback.format_exc())


def cache_keys(jobs: list[CompileJob], options: CompilerOptions,
               workdir: Path | None = None) -> list[str]:
    """The compile cache's key of each job (cache.py); an int8 job's includes the
    calibration samples in its work directory (another set of samples, another blob)."""
    cache = CompileCache.for_options(options)
    return [cache.key(j.backend, j.segment, j.options or options,
                      _calibration_digest(j, options, workdir)) for j in jobs]


def _calibration_digest(job: CompileJob, options: CompilerOptions,
                        workdir: Path | None) -> str:
    from fuseflow.quantize import CALIBRATION_FILE

    if (job.options or options).quantize != "int8" or workdir is None:
        return ""
    path = Path(workdir) / job.directory / CALIBRATION_FILE
    if not path.exists():
        return ""
    with np.load(path, allow_pickle=False) as saved:  # the arrays: a zip's bytes hold times
        return values_digest({name: saved[name] for name in saved.files})


def _wait_any(workers: list[_Worker]) -> None:
    busy = [w.reader for w in workers if w.job is not None]
    if busy:
        wait(busy, timeout=1.0)


def _poll(w: _Worker, timeout_s: float):
    """The worker's outcome if it has one now (result, death or timeout), else None."""
    if w.job is None:
        return None
    while w.reader.poll():
        try:
            message = w.reader.recv()
        except (EOFError, OSError):
            return ("error", (f"compiler process died (exit code {w.process.wait()})", ""))
        if message[0] == "started":
            # The clock starts when the worker has its libraries loaded and the segment
            # (CLOCK_MONOTONIC is shared by all processes).
            w.job, w.started = (w.job[0], message[1]), True
            continue
        if time.monotonic() - w.job[1] > timeout_s:  # finished, but too late
            break
        return message
    limit = timeout_s if w.started else timeout_s + _STARTUP_S
    if time.monotonic() - w.job[1] > limit:
        return ("error", (f"compile timed out after {timeout_s:g} s", ""))
    return None


def _record(job: CompileJob, seg_dir: Path, outcome, seconds: float, done: int,
            total: int, cached: bool = False, written: bool = False) -> CompiledSegment:
    """written: the worker wrote the executable into seg_dir already."""
    segment = job.segment
    if outcome[0] == "ok":
        artifact: Artifact = outcome[1]
        seg_dir.mkdir(parents=True, exist_ok=True)
        _write_artifact(seg_dir, artifact, executable=not written)
        if cached:
            log.info("%s (%d ops) on %s taken from the compile cache [%d/%d]", segment.name,
                     segment.node_count, job.backend, done, total)
        else:
            log.info("compiled %s (%d ops) on %s in %.1f s [%d/%d]", segment.name,
                     segment.node_count, job.backend, seconds, done, total)
        return CompiledSegment(segment, artifact, None, seconds, job.backend, cached,
                               job.options, seg_dir / EXECUTABLE_FILE,
                               seg_dir / SEGMENT_FILE if written else None)
    first, detail = outcome[1]
    (seg_dir / "compile.log").write_text(f"{first}\n{detail}")
    log.warning("segment %s failed to compile on %s: %s [%d/%d]", segment.name, job.backend,
                first, done, total)
    return CompiledSegment(segment, None, first, seconds, job.backend, options=job.options)


def _write_artifact(seg_dir: Path, artifact: Artifact, executable: bool = True) -> None:
    if executable:
        (seg_dir / EXECUTABLE_FILE).write_bytes(artifact.executable)
    (seg_dir / "compile.log").write_text(artifact.log)
    for name, data in artifact.files.items():
        (seg_dir / name).write_bytes(data)
