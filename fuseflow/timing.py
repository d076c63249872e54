"""Time compiled segments against the TensorFlow ops they replace, as they will run.

Each candidate runs as it will in the model: its fused node (FuseflowOp or an
XLA call) in a TF session, fed the values the original model computes at the
segment's inputs. The TF side runs the segment's own ops in a session of the
same kind. Both are timed one call at a time (median latency) and with calls in
flight (time per call with 2 threads calling), after warm-up calls that absorb
first-call costs (XLA compiles at its first call).

Jobs of one group (int8 against bf16, precision.py) are timed call by call in
turn, latency only: on a shared machine, load that changes while they are timed
then hits each alike, where timing one after the other could rank them by the
load of the moment.

Timing runs in a fresh process, one candidate after another: a crashing backend
costs only its timing, and no compile worker shares the cores meanwhile.
compile() starts that process ahead (prestart, inside warm_interpreters): it
imports TensorFlow and fuseflow while the segments compile, then waits for its
one job.

A timing process that outlives its time is asked for its Python stacks, which
the log shows, then stopped; what it had timed by then still counts (it saves its
results after each candidate), and the candidate it was on is named.

FUSEFLOW_INJECT_FAULT=slow[@BACKEND[/PRECISION]] adds 5 ms to every timed call of a
compiled candidate (of that precision only, e.g. slow@openvino/int8): a segment slower
than TF, or an int8 segment slower than its bf16 one, on any machine, for the tests of
those paths; hang@... makes its calls never return, and crash@... abort the process.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import hashlib
import json
import logging
import os
import pickle
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fuseflow.backends.base import Artifact, SegmentGraph
from fuseflow.options import CompilerOptions

log = logging.getLogger("fuseflow")

IN_FLIGHT = 2  # calls in flight for the throughput figure (cores of a small replica)
_WARMUP = 2
_MIN_RUNS, _MAX_RUNS = 5, 200
_MIN_INTERLEAVED = 11  # calls of each job of a group, at least
_SECONDS_PER_SIDE = 0.3  # per candidate: latency calls, then as long again in flight
_INJECTED_DELAY_S = 0.005
# Seconds a timing process may take beyond its budget: its imports and the candidates'
# set-up (a first call, where Grappler folds ResNet50's weights), on a loaded machine.
_START_S = 120
# A blob this big goes to the timing process as a file it maps, not in the pickle.
_BLOB_FILE_BYTES = 1 << 20


@dataclass(frozen=True)
class TimingJob:
    key: str
    backend: str | None  # None: TensorFlow running the segment's own ops
    segment: SegmentGraph
    artifact: Artifact | None
    inputs: list[np.ndarray]
    options: CompilerOptions | None = None  # the artifact's own (else time_jobs')
    precision: str | None = None  # for FUSEFLOW_INJECT_FAULT=slow@BACKEND/PRECISION
    in_flight: bool = True  # also time calls in flight (else in_flight_ms = latency_ms)
    group: str | None = None  # jobs of one group are timed call by call in turn
    # A FuseflowOp's artifact.executable, moved to this file (_bytes_as_files)
    executable_file: str | None = None
    # Files that hold artifact.executable and segment.graph_def_bytes already: the
    # compile's own (CompiledSegment's). The segment's bytes then go as that file's path.
    blob_file: Path | None = None
    segment_file: Path | None = None


@dataclass(frozen=True)
class Timing:
    latency_ms: float  # median of single calls
    in_flight_ms: float  # wall time per call with IN_FLIGHT calls in flight
    runs: int

    def as_dict(self) -> dict:
        return {"latency_ms": round(self.latency_ms, 4),
                "in_flight_ms": round(self.in_flight_ms, 4), "runs": self.runs}


def time_jobs(jobs: list[TimingJob], options: CompilerOptions, budget_s: float,
              workdir: Path) -> tuple[dict[str, Timing], dict[str, str]]:
    """Timings by job key, and errors by job key; jobs past the budget are left out.
    A candidate that kills the timing process costs its own timing: the jobs after it
    go to a new one. One that hangs it costs its own and those not yet timed."""
    if not jobs:
        return {}, {}
    jobs = _bytes_as_files(jobs, options, workdir)
    timings: dict[str, Timing] = {}
    failures: dict[str, str] = {}
    deadline = time.monotonic() + budget_s
    while jobs:
        left = max(0.0, deadline - time.monotonic())
        result, why = _in_fresh_process("main", (jobs, options, left), workdir,
                                         left + _START_S)
        done, failed, running = result or ({}, {}, [])
        timings.update(done)
        failures.update(failed)
        if why is None:
            break
        failures.update(dict.fromkeys(running, f"timing process {why} while timing it"))
        jobs = [j for j in jobs if j.key not in timings and j.key not in failures]
        if not running or why == "timed out":  # no culprit to leave out, or no time left
            failures.update({j.key: f"timing process {why}" for j in jobs})
            break
    return timings, failures


def _bytes_as_files(jobs: list[TimingJob], options: CompilerOptions, workdir: Path
                    ) -> list[TimingJob]:
    """The jobs with their big bytes in files, not in the pickle.

    Each big FuseflowOp blob goes as a file that the timing process maps as a compiled
    model's asset: pickled, then copied into the fused node, imported and handed to the
    kernel, ResNet50's 100 MB blob cost each candidate about a second before its first
    call. The file is the compile's own where the job names it (writing ResNet50's blob
    again cost 0.35 s), else one written here, once per blob.
    A big segment whose GraphDef is in the compile's own file goes as that file's path:
    pickling ResNet50's 100 MB and reading it back cost 0.6 s."""
    from fuseflow.backends import get_backend
    from fuseflow.rewrite import fused_node_apart

    paths: dict[int, str] = {}
    slim: dict[int, SegmentGraph] = {}
    out = []
    for job in jobs:
        blob = job.artifact.executable if job.artifact is not None else b""
        if len(blob) >= _BLOB_FILE_BYTES and fused_node_apart(
                get_backend(job.backend), job.segment, "timed", job.artifact,
                job.options or options)[1]:
            if id(blob) not in paths:
                if job.blob_file is not None and _holds(job.blob_file, blob):
                    paths[id(blob)] = str(job.blob_file)
                else:
                    path = workdir / f"timing_blob_{len(paths)}.bin"
                    path.write_bytes(blob)
                    paths[id(blob)] = str(path)
            job = dataclasses.replace(
                job, artifact=dataclasses.replace(job.artifact, executable=b""),
                executable_file=paths[id(blob)])
        segment = job.segment
        if (len(segment.graph_def_bytes) >= _BLOB_FILE_BYTES and job.segment_file is not None
                and _holds(job.segment_file, segment.graph_def_bytes)):
            if id(segment) not in slim:
                slim[id(segment)] = dataclasses.replace(segment, graph_def_bytes=b"")
            job = dataclasses.replace(job, segment=slim[id(segment)])
        out.append(job)
    return out


def _holds(path: Path, data: bytes) -> bool:
    """Whether the file holds these bytes: its size, and its last bytes (cheap: the whole
    file is not read again)."""
    try:
        if path.stat().st_size != len(data):
            return False
        with path.open("rb") as f:
            f.seek(max(0, len(data) - 4096))
            return f.read() == data[-4096:]
    except OSError:
        return False


# A fresh interpreter that imports fuseflow, then runs the one job named on its stdin
# (a JSON list: function, then its arguments); an empty stdin ends it. Once the job has
# written its result it leaves at once: tearing down TF's sessions and graphs (ResNet50's
# 100 MB of weights) took over a second that compile() waited for.
_STANDBY = """
import faulthandler, json, os, signal, sys
import fuseflow.timing
line = sys.stdin.readline()
if line:
    function, *args = json.loads(line)
    stacks = open(args[-1] + ".stacks", "w")  # args[-1]: the result file (dst)
    faulthandler.register(signal.SIGUSR1, file=stacks, all_threads=True)
    getattr(fuseflow.timing, function)(*args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
"""
# The compile()'s slot for a started interpreter (warm_interpreters), else None.
_SLOT: contextvars.ContextVar[list[subprocess.Popen] | None] = contextvars.ContextVar(
    "fuseflow_timing_interpreter", default=None)


def _interpreter(env: dict[str, str] | None = None) -> subprocess.Popen:
    # Its output goes to a file, not a pipe: the parent waits for the process to end, not
    # for its pipes to close, which anything it started can hold open after it ended (make
    # test runs saw timing processes that had done their work, or aborted, time out).
    # Its own process group: stopping it stops whatever it started too.
    output = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen([sys.executable, "-c", _STANDBY], stdin=subprocess.PIPE,
                            stdout=output, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env=env)
    proc.output = output
    return proc


def _stop(proc: subprocess.Popen) -> str:
    """Stops the process and what it started; returns the last line it wrote (its error,
    when it died of one)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    tail = ""
    with contextlib.suppress(OSError, ValueError):
        proc.output.seek(0)
        tail = (proc.output.read().strip().splitlines() or [""])[-1]
    for file in (proc.stdin, proc.output):
        with contextlib.suppress(OSError):
            file.close()
    return tail


@contextlib.contextmanager
def warm_interpreters():
    """Within: prestart() starts the next timing process ahead of its job. Any left
    unused are stopped on exit."""
    slot: list[subprocess.Popen] = []
    token = _SLOT.set(slot)
    try:
        yield
    finally:
        _SLOT.reset(token)
        for proc in slot:
            _stop(proc)


def prestart() -> None:
    """Start the next timing process now (inside warm_interpreters; else nothing)."""
    slot = _SLOT.get()
    if slot is not None and not slot:
        slot.append(_interpreter())


def _in_fresh_process(function: str, payload, workdir: Path, timeout_s: float,
                      env: dict[str, str] | None = None):
    """function(payload) of this module run in a new interpreter (prestarted, unless it
    needs its own `env`), through pickle files: (its result, None), or (what it had saved
    of its result, if anything, else None; why it did not finish)."""
    src, dst = workdir / f"timing_{function}_in.pkl", workdir / f"timing_{function}_out.pkl"
    src.write_bytes(pickle.dumps(payload))
    dst.unlink(missing_ok=True)
    slot = _SLOT.get()
    proc = slot.pop() if slot and env is None else _interpreter(env)
    stacks = Path(f"{dst}.stacks")  # where _STANDBY has faulthandler write them
    stacks.unlink(missing_ok=True)
    why = None
    try:
        with contextlib.suppress(BrokenPipeError):  # it died before it read its job
            proc.stdin.write(json.dumps([function, str(src), str(dst)]) + "\n")
            proc.stdin.close()
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _log_stacks(proc, stacks, f"the timing process ({_PURPOSE.get(function, function)}) "
                                  f"ran past its {timeout_s:.0f} s")
        why = "timed out"
    finally:  # also when interrupted: the process must not outlive compile()
        tail = _stop(proc)
    result = pickle.loads(dst.read_bytes()) if dst.exists() else None
    if why is None and (proc.returncode != 0 or result is None):
        why = f"died: {tail or f'exit code {proc.returncode}'}"
    return result, why


_PURPOSE = {"main": "timing the candidates", "models_main": "timing the whole model"}


def _log_stacks(proc: subprocess.Popen, stacks: Path, what: str) -> None:
    """Logs where a hung timing process is, from the stacks it writes on SIGUSR1: its
    main thread's innermost frames as a warning, every thread's at debug."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGUSR1)
    text = ""
    for _ in range(25):  # it writes them as it takes the signal, unbuffered
        time.sleep(0.2)
        with contextlib.suppress(OSError):
            text = stacks.read_text()
        if text:
            time.sleep(0.2)
            text = stacks.read_text()
            break
    # faulthandler lists the newest thread first: the main thread, which ran the job,
    # is the last.
    main = text.strip().split("\n\n")[-1].splitlines()[1:7]
    frames = [re.sub(r'File "(.*)", line (\d+) in (.*)',
                     lambda m: f"{m[3]} ({Path(m[1]).name}:{m[2]})", f.strip()) for f in main]
    log.warning("%s and was stopped; it was at (innermost first): %s", what,
                " <- ".join(frames) if frames else
                f"unknown (it wrote no stacks; {_process_state(proc)})")
    log.debug("the timing process's stacks:\n%s", text)


def _process_state(proc: subprocess.Popen) -> str:
    """What the kernel says of a process that did not answer for its stacks: its state and
    the call it waits in (D: uninterruptible, e.g. on the disk), or that it had just ended."""
    code = proc.poll()
    if code is not None:
        return f"it had just exited with {code}"
    try:
        state = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        wchan = Path(f"/proc/{proc.pid}/wchan").read_text().strip() or "-"
    except (OSError, IndexError):
        return "its state is unknown"
    return f"its state was {state}, waiting in {wchan}"


@functools.lru_cache(maxsize=2)
def _read(path: Path) -> bytes:
    """A file's bytes, read once for all the jobs that name it."""
    return path.read_bytes()


def _graph(job: TimingJob, options: CompilerOptions):
    """A TF graph that runs the job, with its feed and fetch names, and the ops to run
    once before it (registering a blob's file)."""
    from fuseflow.tf_compat import tf

    segment = job.segment
    if job.segment_file is not None and not segment.graph_def_bytes:  # _bytes_as_files
        segment = dataclasses.replace(segment, graph_def_bytes=_read(job.segment_file))
    graph = tf.Graph()
    if job.backend is None:
        with graph.as_default():
            tf.graph_util.import_graph_def(
                tf.compat.v1.GraphDef.FromString(segment.graph_def_bytes), name="")
        return (graph, [f"{p.name}:0" for p in segment.inputs],
                [p.name for p in segment.outputs], [])
    from fuseflow.assets import AssetFile, add_assets_op, use_file
    from fuseflow.backends import get_backend
    from fuseflow.graph_util import split_weights
    from fuseflow.rewrite import add_segment_function

    graph_def = tf.compat.v1.GraphDef()
    # Loop and conditional bodies the segment calls.
    graph_def.library.CopyFrom(split_weights(segment)[0].library)
    for port in segment.inputs:
        ph = graph_def.node.add(name=port.name, op="Placeholder")
        ph.attr["dtype"].type = port.dtype
        ph.attr["shape"].shape.CopyFrom(tf.TensorShape(port.shape).as_proto())
    function_name = f"{segment.name}_native"
    fused = get_backend(job.backend).fused_node(segment, function_name, job.artifact, options)
    files = []
    if job.executable_file:
        # Its blob mapped from the file, unchecked: the node's CRC is the empty blob's.
        # Keyed by the whole path: the compile's files share a name (executable.bin).
        path = Path(job.executable_file)
        key = f"timed-{hashlib.sha256(bytes(path)).hexdigest()[:16]}-{path.name}"
        use_file(fused, key, crc="")
        files.append(AssetFile(key, path))
    # A FuseflowOp's fallback must not run while it is timed (_fused_path_ran checks), so
    # it goes without its weights: ResNet50's 100 MB cost each candidate seconds to import.
    # An XLA call runs its function: that one keeps them.
    add_segment_function(graph_def.library, segment, function_name,
                         weights=fused.op != "FuseflowOp")
    fused.name = "fuseflow_timed"
    fused.input.extend(p.name for p in segment.inputs)
    graph_def.node.append(fused)
    with graph.as_default():
        tf.graph_util.import_graph_def(graph_def, name="")
    init = [add_assets_op(graph, files)[0]] if files else []
    return (graph, [f"{p.name}:0" for p in segment.inputs],
            [f"fuseflow_timed:{k}" for k in range(len(segment.outputs))], init)


def _fused_path_ran(before: dict) -> None:
    """Raises if a timed FuseflowOp did not run its own executable: it fell back to TF, or
    recompiled from its fallback function (its blob did not import). That timing would
    not be the candidate's, and its fallback has no weights here (_graph)."""
    from fuseflow.runtime import since

    for name, counts in since(before)["ops"].items():
        if counts.get("fallback") or counts.get("recompiled"):
            reasons = [f"{k}: {v.get('message', '')}"
                       for k, v in (counts.get("fallback_reasons") or {}).items()]
            if counts.get("recompiled"):
                reasons.append(f"recompiled: {counts.get('recompile_reason', '')}")
            why = "; ".join(r.strip().splitlines()[0] if r.strip() else r for r in reasons)
            raise RuntimeError(f"the compiled segment did not run ({name}: {why})")


def _time_one(job: TimingJob, options: CompilerOptions) -> Timing:
    from fuseflow.runtime import runtime_stats

    before = runtime_stats()
    timing = _latency_and_in_flight(job, options)
    _fused_path_ran(before)
    return timing


def _latency_and_in_flight(job: TimingJob, options: CompilerOptions) -> Timing:
    from fuseflow.tf_compat import tf

    graph, feeds, fetches, init = _graph(job, job.options or options)
    with tf.compat.v1.Session(graph=graph) as sess:
        if init:
            sess.run(init)
        run = _with_fault(job, sess.make_callable(fetches, feeds))
        for _ in range(_WARMUP):
            run(*job.inputs)
        samples: list[float] = []
        start = time.perf_counter()
        while len(samples) < _MAX_RUNS and (
                len(samples) < _MIN_RUNS or time.perf_counter() - start < _SECONDS_PER_SIDE):
            t0 = time.perf_counter()
            run(*job.inputs)
            samples.append(time.perf_counter() - t0)
        latency = statistics.median(samples)
        if not job.in_flight:
            return Timing(latency * 1e3, latency * 1e3, len(samples))
        calls = max(_MIN_RUNS, min(_MAX_RUNS, int(_SECONDS_PER_SIDE / max(latency, 1e-6))))

        def worker():
            for _ in range(calls):
                run(*job.inputs)

        threads = [threading.Thread(target=worker) for _ in range(IN_FLIGHT)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        in_flight = (time.perf_counter() - t0) / (calls * IN_FLIGHT)
    return Timing(latency * 1e3, in_flight * 1e3, len(samples))


def _time_group(jobs: list[TimingJob], options: CompilerOptions) -> dict[str, Timing]:
    """The group's jobs timed call by call in turn (A, B, A, B, ...): median latency of
    each; in_flight_ms repeats it."""
    from fuseflow.runtime import runtime_stats
    from fuseflow.tf_compat import plain_session_config, tf

    before = runtime_stats()
    calls, sessions = {}, []
    try:
        for job in jobs:
            graph, feeds, fetches, init = _graph(job, job.options or options)
            # Grappler only rewrites around the fused node (and folds its fallback's
            # constants): it would cost a first call seconds and change nothing timed.
            # TF's own ops get it, as they run in the original model.
            sessions.append(tf.compat.v1.Session(
                graph=graph, config=None if job.backend is None else plain_session_config()))
            if init:
                sessions[-1].run(init)
            run = _with_fault(job, sessions[-1].make_callable(fetches, feeds))
            for _ in range(_WARMUP):
                run(*job.inputs)
            calls[job.key] = (run, job.inputs)
        samples: dict[str, list[float]] = {key: [] for key in calls}
        start = time.perf_counter()
        while len(samples[jobs[0].key]) < _MAX_RUNS and (
                len(samples[jobs[0].key]) < _MIN_INTERLEAVED
                or time.perf_counter() - start < _SECONDS_PER_SIDE * len(jobs)):
            for key, (run, inputs) in calls.items():
                t0 = time.perf_counter()
                run(*inputs)
                samples[key].append(time.perf_counter() - t0)
    finally:
        for sess in sessions:
            sess.close()
    _fused_path_ran(before)
    out = {}
    for key, times in samples.items():
        ms = statistics.median(times) * 1e3
        out[key] = Timing(ms, ms, len(times))
    return out


def _with_fault(job: TimingJob, run):
    """run, made slower, never returning or aborting where FUSEFLOW_INJECT_FAULT asks."""
    from fuseflow.compile_worker import injected_fault

    fault = job.backend and injected_fault(job.segment.name, job.backend, job.precision)
    if fault == "slow":
        def slow(*args):
            time.sleep(_INJECTED_DELAY_S)
            return run(*args)

        return slow
    if fault == "hang":
        def hung_call(*args):
            threading.Event().wait()

        return hung_call
    if fault == "crash":
        def crashing_call(*args):
            os.abort()

        return crashing_call
    return run


def _save(dst: str, timings: dict, failures: dict, running: list[str]) -> None:
    """The results so far, and the jobs being timed now, replacing the last save: what a
    timing process that hangs leaves behind."""
    part = Path(f"{dst}.part")
    part.write_bytes(pickle.dumps((timings, failures, running)))
    os.replace(part, dst)


def main(src: str, dst: str) -> None:
    import fuseflow  # noqa: F401  (registers FuseflowOp)
    from fuseflow import errors
    from fuseflow.logs import tf_quiet

    jobs, options, budget_s = pickle.loads(Path(src).read_bytes())
    timings: dict[str, Timing] = {}
    failures: dict[str, str] = {}
    deadline = time.monotonic() + budget_s
    batches: dict[object, list[TimingJob]] = {}
    for k, job in enumerate(jobs):  # a group together, where its first job was
        batches.setdefault(k if job.group is None else ("group", job.group), []).append(job)
    with tf_quiet():
        for batch in batches.values():
            if time.monotonic() > deadline:
                failures.update(dict.fromkeys(
                    (j.key for j in batch), "not timed: the profiling budget was spent"))
                continue
            _save(dst, timings, failures, [j.key for j in batch])
            try:
                if batch[0].group is None:
                    timings[batch[0].key] = _time_one(batch[0], options)
                else:
                    timings.update(_time_group(batch, options))
            except Exception as e:  # a candidate that can't run is not a candidate
                failures.update(dict.fromkeys((j.key for j in batch), errors.reason(e)))
    _save(dst, timings, failures, [])


@dataclass(frozen=True)
class ModelTimingJob:
    original: str | None  # SavedModel directories; no original: run the compiled one once
    compiled: str
    tags: list[str]
    signature_key: str
    feeds: dict[str, np.ndarray]  # signature input key -> value
    seconds: float  # per model, after warm-up
    both_loaders: bool = False  # also call the compiled model through TF2's loader, first


def time_models(job: ModelTimingJob, workdir: Path, env: dict[str, str] | None = None
                ) -> dict | None:
    """The original and the compiled model, each loaded as a server would and called in
    turn: {original_ms, compiled_ms, speedup}, or None when they could not be timed.
    Without an original: {} once the compiled model ran (xla_cache.py fills its cache so)."""
    result, why = _in_fresh_process("models_main", job, workdir, 600, env)
    return None if why else result


def _call_with_tf2_loader(job: ModelTimingJob) -> None:
    """One call through tf.saved_model.load: it renames the model's functions (so XLA's
    cache keys differ from a session's) by a counter, the same in every fresh process
    that loads the model before tracing anything."""
    from fuseflow.tf_compat import tf

    function = tf.saved_model.load(job.compiled, tags=job.tags).signatures[job.signature_key]
    function(**{k: tf.constant(v) for k, v in job.feeds.items()})


def _model_callable(sess, model_dir: str, job: ModelTimingJob):
    from fuseflow.tf_compat import tf

    meta = tf.compat.v1.saved_model.loader.load(sess, job.tags, model_dir)
    signature = meta.signature_def[job.signature_key]
    keys = sorted(job.feeds)
    run = sess.make_callable([t.name for t in signature.outputs.values()],
                             [signature.inputs[k].name for k in keys])
    return lambda: run(*[job.feeds[k] for k in keys])


def models_main(src: str, dst: str) -> None:
    import fuseflow  # noqa: F401  (registers FuseflowOp)
    from fuseflow.logs import tf_quiet
    from fuseflow.tf_compat import tf

    job: ModelTimingJob = pickle.loads(Path(src).read_bytes())
    samples: dict[str, list[float]] = {"original": [], "compiled": []}
    with tf_quiet():
        if job.both_loaders:
            _call_with_tf2_loader(job)
        if job.original is None:
            with tf.Graph().as_default() as graph, tf.compat.v1.Session(graph=graph) as sess:
                _model_callable(sess, job.compiled, job)()
            Path(dst).write_bytes(pickle.dumps({}))
            return
        graphs = {side: tf.Graph() for side in samples}
        sessions = {side: tf.compat.v1.Session(graph=g) for side, g in graphs.items()}
        calls = {}
        for side, path in (("original", job.original), ("compiled", job.compiled)):
            with graphs[side].as_default():
                calls[side] = _model_callable(sessions[side], path, job)
            for _ in range(_WARMUP + 1):
                calls[side]()
        deadline = time.perf_counter() + 2 * job.seconds
        while time.perf_counter() < deadline or len(samples["compiled"]) < _MIN_RUNS:
            for side in samples:  # interleaved: load drifting hits both alike
                t0 = time.perf_counter()
                calls[side]()
                samples[side].append(time.perf_counter() - t0)
            if len(samples["compiled"]) >= _MAX_RUNS:
                break
    original, compiled = (statistics.median(samples[s]) * 1e3 for s in samples)
    Path(dst).write_bytes(pickle.dumps({
        "original_ms": round(original, 4), "compiled_ms": round(compiled, 4),
        "speedup": round(original / max(compiled, 1e-9), 3), "runs": len(samples["compiled"])}))
