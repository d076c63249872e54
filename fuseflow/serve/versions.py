"""A model base path as TF Serving reads it: `<base>/<version>/saved_model.pb`.

`ModelVersions` keeps the latest version loaded, and on `refresh()` loads a newer one
that appeared on disk; the old one keeps answering until the new one has loaded and run
once, then it is dropped (TF Serving's "latest" version policy, availability first).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fuseflow.serve.rest import PREDICT_METHOD, RestError, TensorSpec

log = logging.getLogger("fuseflow.serve")


def versions_on_disk(base: str | Path) -> list[int]:
    """Numeric subfolders of base that hold a saved_model.pb, oldest first."""
    base = Path(base)
    if not base.is_dir():
        return []
    return sorted(int(p.name) for p in base.iterdir()
                  if p.name.isdigit() and (p / "saved_model.pb").is_file())


def _spec(key: str, info) -> TensorSpec:
    from fuseflow.tf_compat import tf

    dtype = tf.dtypes.as_dtype(info.dtype)
    shape = None if info.tensor_shape.unknown_rank else tuple(
        None if d.size < 0 else d.size for d in info.tensor_shape.dim)
    return TensorSpec(key, np.dtype(object) if dtype == tf.string else
                      np.dtype(dtype.as_numpy_dtype), shape)


def with_threads(model_dir: Path, threads: int, scratch: Path) -> Path:
    """model_dir, or a copy in scratch whose fused ops run OpenVINO on `threads` threads.

    Replicas sharing a machine must not each start one OpenVINO thread per core. The
    thread count is a property of each FuseflowOp, so a copy of saved_model.pb gets it;
    variables and assets are linked, not copied.
    """
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel.FromString((model_dir / "saved_model.pb").read_bytes())
    changed = 0
    for meta in proto.meta_graphs:
        graph = meta.graph_def
        for node in [*graph.node, *(n for f in graph.library.function for n in f.node_def)]:
            if node.op != "FuseflowOp":
                continue
            props = [p for p in node.attr["properties"].list.s
                     if not p.startswith(b"INFERENCE_NUM_THREADS=")]
            del node.attr["properties"].list.s[:]
            node.attr["properties"].list.s.extend(
                props + [f"INFERENCE_NUM_THREADS={threads}".encode()])
            changed += 1
    if not changed:
        return model_dir
    copy = Path(tempfile.mkdtemp(prefix=f"{model_dir.name}-", dir=scratch))
    for entry in model_dir.iterdir():
        if entry.name != "saved_model.pb":
            os.symlink(entry.resolve(), copy / entry.name)
    (copy / "saved_model.pb").write_bytes(proto.SerializeToString())
    return copy


@dataclass
class Signature:
    key: str
    method: str
    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]
    function: object  # the loaded concrete function


@dataclass
class LoadedVersion:
    version: int
    path: Path
    signatures: dict[str, Signature]
    metadata: dict  # TF Serving's `metadata.signature_def` JSON
    _keep: object = field(default=None, repr=False)  # the loaded object owns the functions

    def signature(self, key: str | None) -> Signature:
        key = key or "serving_default"
        if key not in self.signatures:
            raise RestError("INVALID_ARGUMENT", f"Serving signature name: \"{key}\" not "
                            f"found in signature def; it has {sorted(self.signatures)}")
        return self.signatures[key]

    def run(self, signature: Signature, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from fuseflow.tf_compat import tf

        out = signature.function(**{k: tf.constant(v) for k, v in feeds.items()})
        return {k: v.numpy() for k, v in out.items()}


def load_version(base: Path, version: int, threads: int | None, scratch: Path) -> LoadedVersion:
    """Load `<base>/<version>` with TF2's loader (TF1 and TF2 SavedModels alike)."""
    from google.protobuf import json_format

    from fuseflow.load import read_saved_model_proto
    from fuseflow.tf_compat import tf

    path = base / str(version)
    proto = read_saved_model_proto(str(path))
    meta = next((m for m in proto.meta_graphs if "serve" in m.meta_info_def.tags),
                proto.meta_graphs[0])
    load_dir = with_threads(path, threads, scratch) if threads else path
    loaded = tf.saved_model.load(str(load_dir), tags=list(meta.meta_info_def.tags))
    signatures = {}
    for key, sig in meta.signature_def.items():
        if key not in loaded.signatures:
            continue  # e.g. the TF2 loader's internal __saved_model_init_op
        signatures[key] = Signature(
            key, sig.method_name or PREDICT_METHOD,
            {k: _spec(k, v) for k, v in sorted(sig.inputs.items())},
            {k: _spec(k, v) for k, v in sorted(sig.outputs.items())},
            loaded.signatures[key])
    metadata = {"signature_def": json_format.MessageToDict(
        _signature_map(meta), preserving_proto_field_name=True)}
    return LoadedVersion(version, path, signatures, metadata, loaded)


def _signature_map(meta):
    """TF Serving's SignatureDefMap JSON has the shape of MetaGraphDef's map field alone."""
    from tensorflow.core.protobuf import meta_graph_pb2

    holder = meta_graph_pb2.MetaGraphDef()
    for key, sig in meta.signature_def.items():
        if not key.startswith("__"):
            holder.signature_def[key].CopyFrom(sig)
    return holder


def warm_up(version: LoadedVersion) -> None:
    """Run every signature whose inputs are fully known except dim 0 once, at batch 1: a
    version that loads but cannot run is not put in front of requests."""
    for sig in version.signatures.values():
        if sig.method != PREDICT_METHOD or any(
                s.shape is None or any(d is None for d in s.shape[1:]) or s.dtype == object
                for s in sig.inputs.values()):
            continue
        if any(not s.shape for s in sig.inputs.values()):
            continue  # scalars: nothing to batch, nothing safe to guess
        feeds = {k: np.zeros((s.shape[0] or 1, *s.shape[1:]), dtype=s.dtype)
                 for k, s in sig.inputs.items()}
        version.run(sig, feeds)


class ModelVersions:
    """The servable versions of one model base path, in one replica."""

    def __init__(self, name: str, base: str | Path, threads: int | None = None):
        self.name, self.base, self.threads = name, Path(base), threads
        self._scratch = Path(tempfile.mkdtemp(prefix=f"fuseflow-serve-{name}-"))
        self._lock = threading.Lock()
        self._latest: LoadedVersion | None = None
        self._failed: dict[int, str] = {}
        self._failed_stamp: dict[int, float] = {}

    def _stamp(self, version: int) -> float:
        """The newest mtime under a version folder: a failed version is retried once its
        files change (e.g. it was still being copied in)."""
        folder = self.base / str(version)
        return max((p.stat().st_mtime for p in folder.rglob("*")), default=0.0)

    def refresh(self) -> bool:
        """Load the newest version on disk if it is newer than the served one; True if so."""
        on_disk = [v for v in versions_on_disk(self.base)
                   if v not in self._failed or self._stamp(v) != self._failed_stamp[v]]
        if not on_disk or (self._latest and on_disk[-1] <= self._latest.version):
            return False
        version = on_disk[-1]
        stamp = self._stamp(version)
        try:
            loaded = load_version(self.base, version, self.threads, self._scratch)
            warm_up(loaded)
        except Exception as e:  # a broken version never replaces a working one
            self._failed_stamp[version] = stamp
            self._failed[version] = str(e).splitlines()[0] if str(e) else type(e).__name__
            log.error("model %s version %d failed to load, still serving %s: %s", self.name,
                      version, self._latest.version if self._latest else "nothing", e)
            return False
        with self._lock:
            self._latest = loaded
            self._failed.pop(version, None)
        log.info("model %s: serving version %d from %s", self.name, version, loaded.path)
        return True

    @property
    def latest(self) -> LoadedVersion | None:
        return self._latest

    def get(self, version: int | None) -> LoadedVersion:
        latest = self._latest
        if latest is None or (version is not None and version != latest.version):
            spec = f"Specific({self.name}, {version})" if version is not None else \
                f"Latest({self.name})"
            raise RestError("NOT_FOUND", f"Servable not found for request: {spec}")
        return latest

    def status(self, version: int | None) -> dict:
        """GET /v1/models/<name>[/versions/<v>]: TF Serving's GetModelStatus JSON."""
        states = []
        if self._latest is not None:
            states.append((self._latest.version, "AVAILABLE", "OK", ""))
        states += [(v, "END", "UNKNOWN", msg) for v, msg in sorted(self._failed.items())]
        if version is not None:
            states = [s for s in states if s[0] == version]
        if not states:
            spec = f"Specific({self.name}, {version})" if version is not None else \
                f"Latest({self.name})"
            raise RestError("NOT_FOUND", f"Could not find any versions of model {self.name}"
                            if version is None else f"Servable not found for request: {spec}")
        return {"model_version_status": [
            {"version": str(v), "state": state,
             "status": {"error_code": code, "error_message": msg}}
            for v, state, code, msg in states]}

    def close(self) -> None:
        shutil.rmtree(self._scratch, ignore_errors=True)
