"""The compiler worker process: compiles, then checks, the segments its parent sends.

Run as `python -m fuseflow.compile_worker READ_FD WRITE_FD [BACKEND...]` (the
backends are imported before the first request); every request
(backend name, segment, options, directory) gets exactly one ("ok", Artifact)
or ("error", (line, traceback)).

The big bytes travel as files in the segment's directory, not through the
pipe (pickled, piped and unpickled, ResNet50's 100 MB cost three copies each
way): the request's segment comes without its GraphDef, which the worker reads
from SEGMENT_FILE there, and the artifact comes back without its executable,
which the worker wrote to EXECUTABLE_FILE there (the workdir keeps it anyway).

Before an artifact is accepted it is run on random inputs and compared with
TensorFlow running the same segment: a compiler that returns garbage costs
its segment (which stays in TF), never a silently wrong model.

FUSEFLOW_INJECT_FAULT=crash|hang|error|garbage[:SEGMENT][@BACKEND] makes the
worker fail on purpose, so the recovery paths can be tested with real backends
(and `slow[@BACKEND[/PRECISION]]` makes timing.py see a compiled segment slower
than TF, or an int8 one slower than its bf16 compile).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np

from fuseflow.backends.base import (
    Artifact,
    Backend,
    SegmentGraph,
    random_inputs,
    relative_error,
)
from fuseflow.compile import EXECUTABLE_FILE, SEGMENT_FILE
from fuseflow.options import CompilerOptions


def injected_fault(segment: str, backend: str, precision: str | None = None) -> str | None:
    """The fault FUSEFLOW_INJECT_FAULT asks for on this segment and backend (and, where
    it names one as @BACKEND/PRECISION, this precision), if any."""
    spec, _, only_on = os.environ.get("FUSEFLOW_INJECT_FAULT", "").partition("@")
    kind, _, target = spec.partition(":")
    on = ("", backend) + ((f"{backend}/{precision}",) if precision else ())
    return kind if kind and target in ("", segment) and only_on in on else None


def reference_outputs(segment: SegmentGraph, inputs: list[np.ndarray]) -> list[np.ndarray]:
    from fuseflow.tf_compat import lift_constants, plain_session_config, tf

    graph_def, constants = lift_constants(  # fed: TF copies them once, not ten times
        tf.compat.v1.GraphDef.FromString(segment.graph_def_bytes))
    graph = tf.Graph()
    with graph.as_default():
        tf.graph_util.import_graph_def(graph_def, name="")
    with tf.compat.v1.Session(graph=graph, config=plain_session_config()) as sess:
        return sess.run([p.name for p in segment.outputs],
                        {**constants, **{f"{p.name}:0": v for p, v in zip(segment.inputs,
                                                                           inputs)}})


def verify(backend: Backend, segment: SegmentGraph, artifact: Artifact,
           options: CompilerOptions, inputs: list[np.ndarray] | None = None,
           expected: list[np.ndarray] | None = None) -> str:
    """Compare the artifact with TF on random inputs (or the given ones); raise if they
    disagree. expected: TF's outputs on those inputs, when computed already."""
    where = "random inputs" if inputs is None else "calibration inputs"
    inputs = random_inputs(segment) if inputs is None else inputs
    if expected is None:
        expected = reference_outputs(segment, inputs)
    actual = backend.run(segment, artifact, options, inputs)
    tolerance = backend.tolerance(options)
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


def compile_checked(backend: Backend, segment: SegmentGraph, options: CompilerOptions,
                    seg_dir: Path) -> Artifact:
    fault = injected_fault(segment.name, backend.name)
    if fault == "crash":
        os.abort()
    if fault == "hang":
        time.sleep(10**6)
    if fault == "error":
        raise RuntimeError("injected compiler error")
    # TF's answers for the check need only the segment and the inputs: TF computes them
    # in a thread while the backend compiles (both release the GIL).
    inputs = _calibration_inputs(seg_dir, options)
    pool = ThreadPoolExecutor(1, thread_name_prefix="fuseflow-reference")
    reference: Future = pool.submit(
        reference_outputs, segment, random_inputs(segment) if inputs is None else inputs)
    pool.shutdown(wait=False)  # a failed compile does not wait for it
    start = time.perf_counter()
    artifact = backend.compile(segment, options, seg_dir)
    compiled = time.perf_counter() - start
    if fault == "garbage":
        artifact = dataclasses.replace(
            artifact, executable=os.urandom(len(artifact.executable) or 64))
    start = time.perf_counter()
    check = verify(backend, segment, artifact, options, inputs, reference.result())
    timings = {**artifact.timings, "compile": round(compiled, 3),
               "artifact check": round(time.perf_counter() - start, 3)}
    return dataclasses.replace(artifact, log=artifact.log + check, timings=timings)


def _calibration_inputs(seg_dir: Path, options: CompilerOptions) -> list[np.ndarray] | None:
    """A quantized segment is checked on its first calibration batch: random inputs fall
    outside the calibrated ranges, where int8 is wrong by design."""
    if options.quantize != "int8":
        return None
    from fuseflow.quantize import read_calibration

    batches = read_calibration(seg_dir)
    return batches[0] if batches else None


def main(read_fd: int, write_fd: int, preload: list[str] = ()) -> None:
    from fuseflow.backends import get_backend

    reader = Connection(read_fd, writable=False)
    writer = Connection(write_fd, readable=False)
    backends: dict[str, Backend] = {}
    for name in preload:  # while the parent is still busy: a failure shows at the job
        try:
            backends[name] = get_backend(name)
        except Exception:  # noqa: BLE001
            pass
    while True:
        try:
            backend_name, segment, options, seg_dir = reader.recv()
        except EOFError:
            return
        writer.send(("started", time.monotonic()))
        try:
            seg_dir = Path(seg_dir)
            segment = dataclasses.replace(
                segment, graph_def_bytes=(seg_dir / SEGMENT_FILE).read_bytes())
            if backend_name not in backends:
                backends[backend_name] = get_backend(backend_name)
            backend = backends[backend_name]
            artifact = compile_checked(backend, segment, options, seg_dir)
            (seg_dir / EXECUTABLE_FILE).write_bytes(artifact.executable)
            writer.send(("ok", dataclasses.replace(artifact, executable=b"")))
        except Exception as e:  # every failure goes back to the parent, which decides
            text = str(e).strip()
            first = f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"
            writer.send(("error", (first, traceback.format_exc())))


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:])
