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
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import platform
import struct
import tempfile
from pathlib import Path

from fuseflow.backends.base import Artifact, SegmentGraph
from fuseflow.options import CompilerOptions

log = logging.getLogger("fuseflow")

FORMAT = b"fuseflow-cache-1\n"
# Options that change how a compile runs, never what it produces.
_NOT_IN_KEY = {"must_compile", "timeout_s", "workers", "workdir", "verbose", "ignored_flags",
               "cache", "max_segments", "backend"}


def cache_dir() -> Path:
    env = os.environ.get("FUSEFLOW_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "fuseflow"


@functools.cache
def _versions() -> str:
    """fuseflow's version and backend sources, OpenVINO's, TF's, and this CPU."""
    import fuseflow

    here = Path(__file__).resolve().parent
    sources = hashlib.sha256()
    for path in sorted([*here.glob("backends/*.py"), here / "compile_worker.py"]):
        sources.update(path.read_bytes())
    parts = [f"fuseflow {fuseflow.__version__} {sources.hexdigest()[:16]}",
             f"tf {_version('tensorflow')}", f"openvino {_version('openvino')}",
             f"cpu {platform.machine()} {_cpu_flags()}"]
    return "\n".join(parts)


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
    """lookup/store of artifacts by key(); a cache with directory None does nothing."""

    directory: Path | None

    @classmethod
    def for_options(cls, options: CompilerOptions) -> CompileCache:
        return cls(cache_dir() if options.cache else None)

    def key(self, backend_name: str, segment: SegmentGraph, options: CompilerOptions) -> str:
        h = hashlib.sha256()
        chosen = {k: v for k, v in dataclasses.asdict(options).items() if k not in _NOT_IN_KEY}
        ports = [dataclasses.astuple(p) for p in (*segment.inputs, *segment.outputs)]
        head = json.dumps([backend_name, _versions(), chosen, len(segment.inputs), ports,
                           segment.name], sort_keys=True, default=str)
        h.update(head.encode())
        h.update(_canonical(segment.graph_def_bytes))
        return h.hexdigest()

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.entry"

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
        """Write the entry atomically; a cache that can't be written only logs why."""
        if self.directory is None:
            return
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
            try:
                with os.fdopen(fd, "wb") as f:
                    for chunk in _encode(artifact, key):
                        f.write(chunk)
                os.replace(tmp, path)
            except BaseException:
                os.unlink(tmp)
                raise
        except OSError as e:
            log.warning("compile cache: cannot write %s (%s); compiling goes on without it",
                        path, e.strerror or e)


def _canonical(graph_def_bytes: bytes) -> bytes:
    """The GraphDef's bytes with its maps (node attrs) in key order: plain serialization
    orders them as the process happened to build them, which differs run to run."""
    from fuseflow.tf_compat import tf

    return tf.compat.v1.GraphDef.FromString(graph_def_bytes).SerializeToString(
        deterministic=True)


def _encode(artifact: Artifact, key: str) -> list[bytes]:
    payload = [artifact.executable, *artifact.files.values()]
    digest = hashlib.sha256()
    for part in payload:
        digest.update(part)
    header = json.dumps({"key": key, "log": artifact.log, "executable": len(artifact.executable),
                         "files": {name: len(data) for name, data in artifact.files.items()},
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
    return Artifact(executable=executable, log=header["log"], files=files)
