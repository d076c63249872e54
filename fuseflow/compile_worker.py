"""The compiler worker process: compiles the segments its parent sends, and runs each
on the inputs its parent gives, for the parent to check against TensorFlow.

Run as `python -m fuseflow.compile_worker READ_FD WRITE_FD [BACKEND...]` (the
backends are imported before the first request); every request
("job", backend name, segment, options, directory, check inputs) gets exactly one
("ok", Artifact, outputs on the check inputs) or ("error", (line, traceback));
("preload", backend names) gets no answer: the worker imports them meanwhile;
("call", "module:function", args) gets ("ok", its result) or ("error", ...)
(OpenVINO's frontend probe runs so, where OpenVINO is imported already).
The process imports TensorFlow only for a backend that needs it (XLA): an
OpenVINO compile runs without it (fuseflow/__init__.py), and so the parent, which
has TF, computes TF's answers for the check (compile.py) while this compiles.

The big bytes travel as files in the segment's directory, not through the
pipe (pickled, piped and unpickled, ResNet50's 100 MB cost three copies each
way): the request's segment comes without its GraphDef, which the worker reads
from SEGMENT_FILE there, and the artifact comes back without its executable,
which the worker wrote to EXECUTABLE_FILE there (the workdir keeps it anyway).

FUSEFLOW_INJECT_FAULT=crash|hang|error|garbage[:SEGMENT][@BACKEND] makes the
worker fail on purpose, so the recovery paths can be tested with real backends
(and `slow[@BACKEND[/PRECISION]]` makes timing.py see a compiled segment slower
than TF, or an int8 one slower than its bf16 compile).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np

from fuseflow.backends.base import Artifact, Backend, SegmentGraph
from fuseflow.compile import EXECUTABLE_FILE, SEGMENT_FILE, failure
from fuseflow.options import CompilerOptions


def injected_fault(segment: str, backend: str, precision: str | None = None) -> str | None:
    """The fault FUSEFLOW_INJECT_FAULT asks for on this segment and backend (and, where
    it names one as @BACKEND/PRECISION, this precision), if any."""
    spec, _, only_on = os.environ.get("FUSEFLOW_INJECT_FAULT", "").partition("@")
    kind, _, target = spec.partition(":")
    on = ("", backend) + ((f"{backend}/{precision}",) if precision else ())
    return kind if kind and target in ("", segment) and only_on in on else None


def compile_and_run(backend: Backend, segment: SegmentGraph, options: CompilerOptions,
                    seg_dir: Path, inputs: list[np.ndarray]
                    ) -> tuple[Artifact, list[np.ndarray]]:
    """The artifact, and its outputs on inputs (the parent compares them with TF's)."""
    fault = injected_fault(segment.name, backend.name)
    if fault == "crash":
        os.abort()
    if fault == "hang":
        time.sleep(10**6)
    if fault == "error":
        raise RuntimeError("injected compiler error")
    start = time.perf_counter()
    artifact = backend.compile(segment, options, seg_dir)
    compiled = time.perf_counter() - start
    if fault == "garbage":
        artifact = dataclasses.replace(
            artifact, executable=os.urandom(len(artifact.executable) or 64))
    start = time.perf_counter()
    outputs = [np.asarray(v) for v in backend.run(segment, artifact, options, inputs)]
    timings = {**artifact.timings, "compile": round(compiled, 3),
               "artifact check": round(time.perf_counter() - start, 3)}
    return dataclasses.replace(artifact, timings=timings), outputs


def _call(function: str, args: tuple) -> tuple:
    """("ok", function(*args)) or ("error", (line, traceback)); function: "module:name"."""
    try:
        module, _, name = function.partition(":")
        return ("ok", getattr(importlib.import_module(module), name)(*args))
    except Exception as e:  # noqa: BLE001 - the parent decides
        return ("error", failure(e))


def main(read_fd: int, write_fd: int, preload: list[str] = ()) -> None:
    from fuseflow.backends import get_backend

    reader = Connection(read_fd, writable=False)
    writer = Connection(write_fd, readable=False)
    backends: dict[str, Backend] = {}
    importing = threading.Lock()

    def backend_named(name: str) -> Backend:
        if name not in backends:
            with importing:  # one import of each, whichever thread asks first
                if name not in backends:
                    backends[name] = get_backend(name)
        return backends[name]

    def preload_all(names) -> None:
        for name in names:  # while the parent is still busy: a failure shows at the job
            try:
                backend_named(name)
            except Exception:  # noqa: BLE001
                pass

    def preload_later(names) -> None:
        if names:
            threading.Thread(target=preload_all, args=(names,), daemon=True).start()

    # OpenVINO at once; a backend that imports TensorFlow (3 s) in the background, so
    # that an OpenVINO job need not wait for it.
    preload_all([n for n in preload if n == "openvino"])
    preload_later([n for n in preload if n != "openvino"])
    while True:
        try:
            message = reader.recv()
        except EOFError:
            return
        if message[0] == "preload":  # backends a job will need: no answer
            preload_later(message[1])
            continue
        if message[0] == "call":
            writer.send(_call(*message[1:]))
            continue
        _, backend_name, segment, options, seg_dir, inputs = message
        try:  # the job's clock starts once its backend is imported (maybe in the background)
            backend: Backend | Exception = backend_named(backend_name)
        except Exception as e:  # noqa: BLE001 - answered below
            backend = e
        writer.send(("started", time.monotonic()))
        try:
            if isinstance(backend, Exception):
                raise backend
            seg_dir = Path(seg_dir)
            segment = dataclasses.replace(
                segment, graph_def_bytes=(seg_dir / SEGMENT_FILE).read_bytes())
            artifact, outputs = compile_and_run(backend, segment, options, seg_dir, inputs)
            (seg_dir / EXECUTABLE_FILE).write_bytes(artifact.executable)
            writer.send(("ok", dataclasses.replace(artifact, executable=b""), outputs))
        except Exception as e:  # every failure goes back to the parent, which decides
            writer.send(("error", failure(e)))


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:])
