"""Compile cache: a segment compiled before is not compiled again.

An entry is keyed by everything that decides the artifact: the segment's
GraphDef bytes and ports, the options that reach a backend, the backend, the
versions of fuseflow (and a digest of its backend sources), OpenVINO and
TensorFlow, and the CPU (an OpenVINO blob names the ISA it was built for).
Entries were checked against TensorFlow when they were stored.

Location: $FUSEFLOW_CACHE_DIR, else ~/.cache/fuseflow; `--no-cache` turns it
off. An entry is written to a temp file and renamed into place, so a reader
never sees half of one; each holds a SHA-256 of its payload, and an entry that
fails to read or check is ignored (and removed), never trusted.

The cache also keeps what compile time measured (place.py's timings of candidates
against TF, precision.py's int8 against bf16, the whole model's timing): timing
again an unchanged model on the same machine would cost most of a recompile and
learn nothing. Those entries (`.timing`, JSON) are keyed by the artifact keys of
what was timed, what fed it, the timing code and the CPU and the cores this process
may use; `--retime` measures again (and replaces them), `--no-cache` neither reads
nor writes them. OpenVINO's frontend probe keeps its verdicts the same way (`.probe`,
keyed by the probed graph with its weights zeroed).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import os
import platform
import re
import struct
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from fuseflow.backends.base import Artifact, SegmentGraph
from fuseflow.options import CompilerOptions

log = logging.getLogger("fuseflow")

FORMAT = b"fuseflow-cache-1\n"
TIMING_FORMAT = "fuseflow-timings-1"
# Options that change how a compile runs, never what it produces.
_NOT_IN_KEY = {"must_compile", "timeout_s", "workers", "workdir", "verbose", "ignored_flags",
               "cache", "max_segments", "backend", "retime", "profile", "profile_budget_s"}


def cache_dir() -> Path:
    env = os.environ.get("FUSEFLOW_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "fuseflow"


@functools.cache
def _versions() -> str:
    """fuseflow's version and backend sources, OpenVINO's, TF's, and this CPU."""
    import fuseflow

    here = Path(__file__).resolve().parent
    sources = hashlib.sha256()
    for path in sorted([*here.glob("backends/*.py"), here / "compile_worker.py",
                        here / "quantize.py"]):  # the worker runs NNCF from quantize.py
        sources.update(path.read_bytes())
    parts = [f"fuseflow {fuseflow.__version__} {sources.hexdigest()[:16]}",
             f"tf {_version('tensorflow')}", f"openvino {_version('openvino')}",
             f"cpu {platform.machine()} {_cpu_flags()}"]
    return "\n".join(parts)


@functools.cache
def _timing_identity() -> str:
    """What decides a timing besides its subject: the code that times and decides, the
    versions and CPU of _versions(), and the cores this process may run on."""
    here = Path(__file__).resolve().parent
    sources = hashlib.sha256()
    for name in ("place.py", "timing.py", "precision.py", "saved_model.py"):
        sources.update((here / name).read_bytes())
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return f"{_versions()}\ntiming {sources.hexdigest()[:16]} cores {cores}"


def timing_key(*parts) -> str:
    """The key of a timing entry: parts (JSON-able: artifact keys, batch shapes, a digest
    of the values timed on...) with _timing_identity()."""
    head = json.dumps([TIMING_FORMAT, _timing_identity(), parts], sort_keys=True, default=str)
    return hashlib.sha256(head.encode()).hexdigest()


def values_digest(values) -> str:
    """A digest of arrays (a list, or a dict by name): the inputs a timing ran on."""
    import numpy as np

    items = sorted(values.items()) if isinstance(values, dict) else list(enumerate(values))
    h = hashlib.sha256()
    for name, value in items:
        array = np.ascontiguousarray(value)
        h.update(json.dumps([str(name), str(array.dtype), array.shape]).encode())
        if array.dtype != object:
            h.update(array.tobytes())
        else:
            h.update(repr(array.tolist()).encode())
    return h.hexdigest()


def _version(package: str) -> str:
    from importlib import metadata

    for name in (package, f"{package}-cpu"):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return "unknown"


def _cpu_flags() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    wanted = [ln for ln in lines if ln.startswith(("model name", "flags"))][:2]
    return hashlib.sha256("\n".join(wanted).encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class CompileCache:
    """lookup/store of artifacts by key(), and of compile-time timings by timing_key();
    a cache with directory None does nothing."""

    directory: Path | None

    retime: bool = False  # --retime: timing entries are written, never read

    @classmethod
    def for_options(cls, options: CompilerOptions) -> CompileCache:
        return cls(cache_dir() if options.cache else None, options.retime)

    def key(self, backend_name: str, segment: SegmentGraph, options: CompilerOptions,
            calibration: str = "") -> str:
        """calibration: a digest of the samples an int8 compile is calibrated on, which
        decide its blob as much as the graph does."""
        h = hashlib.sha256()
        chosen = {k: v for k, v in dataclasses.asdict(options).items() if k not in _NOT_IN_KEY}
        ports = [dataclasses.astuple(p) for p in (*segment.inputs, *segment.outputs)]
        head = json.dumps([backend_name, _versions(), chosen, len(segment.inputs), ports,
                           segment.name, calibration], sort_keys=True, default=str)
        h.update(head.encode())
        _hash_graph(h, segment)
        return h.hexdigest()

    def lookup_timings(self, key: str, what: str, kind: str = "timing") -> dict | None:
        """The stored timing entry, or None: missing, disabled, --retime, or unreadable
        (then removed; a damaged entry only costs timing again). kind: the file suffix,
        for other small JSON entries kept the same way (the frontend probe's "probe")."""
        if self.directory is None:
            return None
        if self.retime:
            log.info("%s: %s again (--retime)", what, "timing" if kind == "timing" else "asked")
            return None
        path = self._path(key, f".{kind}")
        try:
            data = path.read_bytes()
        except OSError:
            return None
        try:
            entry = json.loads(data.decode())
            payload = json.dumps(entry["data"], sort_keys=True)
            if entry["format"] != TIMING_FORMAT or entry["key"] != key:
                raise ValueError("entry of another key or format")
            if hashlib.sha256(payload.encode()).hexdigest() != entry["sha256"]:
                raise ValueError("checksum mismatch")
            if not isinstance(entry["data"], dict):
                raise TypeError("not a timing entry")
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            log.debug("compile cache: ignoring damaged %s entry %s (%s)", kind, path, e)
            with contextlib.suppress(OSError):
                path.unlink()
            return None
        return entry["data"]

    def store_timings(self, key: str, data: dict, kind: str = "timing") -> None:
        """Write the timing entry atomically (JSON with a checksum of its data)."""
        if self.directory is None:
            return
        payload = json.dumps(data, sort_keys=True)
        entry = json.dumps({"format": TIMING_FORMAT, "key": key, "data": data,
                            "sha256": hashlib.sha256(payload.encode()).hexdigest()})
        self._write(self._path(key, f".{kind}"), [entry.encode()])

    def _path(self, key: str, suffix: str = ".entry") -> Path:
        return self.directory / key[:2] / f"{key}{suffix}"

    def lookup(self, key: str) -> Artifact | None:
        """The stored artifact, or None (missing, disabled, or unreadable: then removed)."""
        if self.directory is None:
            return None
        path = self._path(key)
        try:
            data = path.read_bytes()
        except OSError:
            return None
        try:
            return _decode(data, key)
        except (ValueError, KeyError, TypeError, struct.error, UnicodeDecodeError) as e:
            log.warning("compile cache: ignoring damaged entry %s (%s)", path, e)
            try:
                path.unlink()
            except OSError:
                pass
            return None

    def store(self, key: str, artifact: Artifact) -> None:
        """Write the entry atomically, in the background (flush() waits for it); a cache
        that can't be written only logs why. ResNet50's 100 MB entry took 0.23 s that
        compile() now spends rewriting the graph on the other core."""
        if self.directory is None:
            return
        _PENDING.append(_WRITER.submit(
            lambda: self._write(self._path(key), _encode(artifact, key))))

    def _write(self, path: Path, chunks: list[bytes]) -> None:
        """A temp file renamed into place: a reader sees all of an entry or none."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
            try:
                with os.fdopen(fd, "wb") as f:
                    for chunk in chunks:
                        f.write(chunk)
                os.replace(tmp, path)
            except BaseException:
                os.unlink(tmp)
                raise
        except OSError as e:
            log.warning("compile cache: cannot write %s (%s); compiling goes on without it",
                        path, e.strerror or e)


# One thread writes entries in order; flush() waits for them (compile() does, before
# it returns). The interpreter joins it at exit, so no entry is left half-written.
_WRITER = ThreadPoolExecutor(1, thread_name_prefix="fuseflow-cache")
_PENDING: list[Future] = []


def flush() -> None:
    """Wait for the entries store() is still writing."""
    while _PENDING:
        _PENDING.pop(0).result()


def _hash_graph(h, segment: SegmentGraph) -> None:
    """h.update with the segment's canonical GraphDef (see canonical), its weights hashed
    apart, by name, dtype, shape and content: parsing and serializing 100 MB of them
    again only to hash them cost ResNet50 0.2 s. Those extract.py appended are read
    where they lie (split_weights)."""
    from fuseflow.graph_util import split_weights, without_weights
    from fuseflow.tf_compat import tf

    light, appended = split_weights(segment)
    light, weights = without_weights(light)
    weights.update((n.name, n) for n in map(tf.compat.v1.NodeDef.FromString, appended))
    h.update(canonical(light))
    for name in sorted(weights):
        value = weights[name].attr["value"].tensor
        data = value.tensor_content or value.SerializeToString(deterministic=True)
        shape = [d.size for d in value.tensor_shape.dim]
        h.update(f"{name}\0{value.dtype}\0{shape}\0{len(data)}\0".encode())
        h.update(data)


def canonical(graph_def_bytes) -> bytes:
    """The GraphDef's bytes as the same graph gives them in any process: maps (node
    attrs) in key order, no debug info, and its functions named by order. Plain
    serialization orders maps as the process happened to build them; and TF numbers
    the functions of a frozen graph per process (`lstm_while_body_frozen_1147`, then
    `_2113` when the same model is compiled again in the same process), as it does the
    function named in the nodes' debug info, and orders the library by when it made
    each function. None of this changes what runs. A GraphDef message (not bytes) is
    rewritten in place: pass one of your own."""
    from fuseflow.tf_compat import tf

    graph = (tf.compat.v1.GraphDef.FromString(graph_def_bytes)
             if isinstance(graph_def_bytes, bytes) else graph_def_bytes)
    renamed = _function_order(f.signature.name for f in graph.library.function)
    nodes = [*graph.node, *(n for f in graph.library.function for n in f.node_def)]
    for node in nodes:
        node.ClearField("experimental_debug_info")
        node.op = renamed.get(node.op, node.op)
        for attr in node.attr.values():
            _rename_functions(attr, renamed)
    for function in graph.library.function:
        function.signature.name = renamed[function.signature.name]
        for attr in function.attr.values():
            _rename_functions(attr, renamed)
    for gradient in graph.library.gradient:
        gradient.function_name = renamed.get(gradient.function_name, gradient.function_name)
        gradient.gradient_func = renamed.get(gradient.gradient_func, gradient.gradient_func)
    # The library lists functions in the order this process made them: by name instead.
    functions = sorted((f.signature.name, f.SerializeToString(deterministic=True))
                       for f in graph.library.function)
    del graph.library.function[:]
    for _, data in functions:
        graph.library.function.add().ParseFromString(data)
    return graph.SerializeToString(deterministic=True)


def _function_order(names) -> dict[str, str]:
    """name -> its stem and its rank among the names of that stem, by their numbers
    (`while_body_frozen_1147` -> `while_body_frozen#0`): TF numbers in creation order,
    which is the same in every process."""
    stems: dict[str, list[tuple[int, str]]] = {}
    for name in names:
        found = re.fullmatch(r"(.*?)_?(\d+)", name)
        stem, number = (found.group(1), int(found.group(2))) if found else (name, -1)
        stems.setdefault(stem, []).append((number, name))
    return {name: f"{stem}#{rank}" for stem, group in stems.items()
            for rank, (_, name) in enumerate(sorted(group))}


def _rename_functions(attr, renamed: dict[str, str]) -> None:
    funcs = [attr.func] if attr.HasField("func") else list(attr.list.func)
    for func in funcs:
        func.name = renamed.get(func.name, func.name)
        for inner in func.attr.values():
            _rename_functions(inner, renamed)


def _encode(artifact: Artifact, key: str) -> list[bytes]:
    payload = [artifact.executable, *artifact.files.values()]
    digest = hashlib.sha256()
    for part in payload:
        digest.update(part)
    header = json.dumps({"key": key, "log": artifact.log, "executable": len(artifact.executable),
                         "files": {name: len(data) for name, data in artifact.files.items()},
                         "properties": artifact.properties,
                         "sha256": digest.hexdigest()}).encode()
    return [FORMAT, struct.pack("<Q", len(header)), header, *payload]


def _decode(data: bytes, key: str) -> Artifact:
    if not data.startswith(FORMAT):
        raise ValueError("not a fuseflow cache entry")
    at = len(FORMAT)
    (size,) = struct.unpack_from("<Q", data, at)
    at += 8
    header = json.loads(data[at:at + size].decode())
    at += size
    if header["key"] != key:
        raise ValueError("entry of another key")
    if hashlib.sha256(data[at:]).hexdigest() != header["sha256"]:
        raise ValueError("payload checksum mismatch")
    executable = data[at:at + header["executable"]]
    at += header["executable"]
    files = {}
    for name, length in header["files"].items():
        files[name] = data[at:at + length]
        at += length
    if at != len(data) or len(executable) != header["executable"]:
        raise ValueError("truncated entry")
    return Artifact(executable=executable, log=header["log"], files=files,
                    properties=list(header.get("properties", [])))
