"""Shared helpers: build real SavedModels, compile them, run them in a fresh process."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
# Compile-time timing (place.py) makes placement follow the machine's load: tests prove
# paths, so they place by op kind; tests of timed placement pass --profile themselves.
# Filling a model's XLA cache runs it once more in a fresh process: only test_xla_cache
# pays for that.
os.environ.setdefault("FUSEFLOW_CC_FLAGS", "--no-profile --no-xla-cache")
# XLA's persistent cache (fuseflow/xla_cache.py) of this process, never the user's: fresh
# processes use their test's FUSEFLOW_CACHE_DIR (the fixtures below).
os.environ.setdefault("FUSEFLOW_CACHE_DIR", str(Path(tempfile.gettempdir())
                                                / f"fuseflow-tests-{os.getuid()}"))
REPO = Path(__file__).resolve().parents[1]

import tensorflow as tf  # noqa: E402

import fuseflow  # noqa: E402,F401  (registers the native op in this process)


def save_tf1(path: Path, build, signatures=None, tags=("serve",), main_op=None,
             extra_tag_sets=()):
    """Build a TF1 graph with build() -> (inputs, outputs) dicts and save it with Builder.

    signatures: optional {key: (inputs, outputs)} built inside build's graph; build may
    return a third item, a dict of extra signatures.
    """
    graph = tf.Graph()
    with graph.as_default(), tf.compat.v1.Session(graph=graph) as sess:
        built = build()
        inputs, outputs = built[0], built[1]
        extra = built[2] if len(built) > 2 else {}
        sess.run(tf.compat.v1.global_variables_initializer())
        init = main_op() if main_op else None
        if init is not None:
            sess.run(init)
        sig = {"serving_default": tf.compat.v1.saved_model.predict_signature_def(inputs, outputs)}
        for key, (i, o) in extra.items():
            sig[key] = tf.compat.v1.saved_model.predict_signature_def(i, o)
        builder = tf.compat.v1.saved_model.Builder(str(path))
        builder.add_meta_graph_and_variables(sess, list(tags), signature_def_map=sig,
                                             main_op=init)
        for t in extra_tag_sets:
            builder.add_meta_graph(list(t), signature_def_map=sig)
        builder.save()
    return path


def run_saved_model(model_dir, feeds: dict, signature="serving_default", tags=None) -> dict:
    """Run a signature in this process through TF2's loader."""
    loaded = tf.saved_model.load(str(model_dir), tags=tags)
    fn = loaded.signatures[signature]
    out = fn(**{k: tf.constant(v) for k, v in feeds.items()})
    return {k: v.numpy() for k, v in out.items()}


_FRESH = textwrap.dedent("""
    import os, sys, json
    import numpy as np
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    import fuseflow
    import tensorflow as tf
    args = json.loads(sys.argv[1])
    feeds = dict(np.load(args["feeds"], allow_pickle=False))
    if args["api"] == "v2":
        loaded = tf.saved_model.load(args["model"], tags=args["tags"])
        fn = loaded.signatures[args["signature"]]
        results = []
        for _ in range(args["repeat"]):
            out = fn(**{k: tf.constant(v) for k, v in feeds.items()})
        out = {k: v.numpy() for k, v in out.items()}
    else:
        g = tf.Graph()
        with g.as_default(), tf.compat.v1.Session(graph=g) as sess:
            meta = tf.compat.v1.saved_model.load(sess, args["tags"] or ["serve"], args["model"])
            sig = meta.signature_def[args["signature"]]
            fetch = {k: v.name for k, v in sig.outputs.items()}
            out = sess.run(fetch, {sig.inputs[k].name: v for k, v in feeds.items()})
    np.savez(args["out"], **{k: v.astype("S") if v.dtype == object else v
                             for k, v in out.items()})
    with open(args["stats"], "w") as f:
        json.dump(fuseflow.runtime_stats(), f)
""")


def run_fresh(model_dir, feeds: dict, tmp_path: Path, signature="serving_default", tags=None,
              api="v2", env=None, with_log=False, backend=None, path="compiled",
              with_stats=False):
    """Load and run a (compiled) model in a new Python process that imports fuseflow.

    With `backend`, asserts (assert_ran) that every fused node of the model ran on `path`
    in that process. Returns the outputs, then the child's stderr with with_log, then its
    fuseflow.runtime_stats() with with_stats.
    """
    feeds_file, out_file = tmp_path / "feeds.npz", tmp_path / "out.npz"
    stats_file = tmp_path / "stats.json"
    np.savez(feeds_file, **feeds)
    args = {"model": str(model_dir), "feeds": str(feeds_file), "out": str(out_file),
            "stats": str(stats_file), "signature": signature,
            "tags": list(tags) if tags else None, "api": api, "repeat": 1}
    proc = subprocess.run([sys.executable, "-c", _FRESH, json.dumps(args)], cwd=REPO,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})
    assert proc.returncode == 0, f"fresh process failed:\n{proc.stderr[-4000:]}"
    with np.load(out_file) as data:
        outputs = dict(data)
    stats = json.loads(stats_file.read_text())
    feeds_file.unlink()
    out_file.unlink()
    stats_file.unlink()
    if backend is not None:
        assert_ran(stats, backend, fused_segments(model_dir, tags), path=path)
    result = (outputs,) + ((proc.stderr,) if with_log else ()) + ((stats,) if with_stats else ())
    return result if len(result) > 1 else outputs


def fused_segments(model_dir, tags=None, backend=None) -> dict[str, str]:
    """{fused node name: the function it runs} of a compiled SavedModel (the meta graph
    with `tags`, else every one): FuseflowOp's native_segment, or the XLA call's f; with
    `backend`, that backend's only."""
    from fuseflow.load import read_saved_model_proto

    proto = read_saved_model_proto(str(model_dir))
    found = {}
    for meta in proto.meta_graphs:
        if tags and set(meta.meta_info_def.tags) != set(tags):
            continue
        graph = meta.graph_def
        nodes = list(graph.node) + [n for f in graph.library.function for n in f.node_def]
        for n in nodes:
            if n.op == "FuseflowOp" and backend in (None, "openvino"):
                found[n.name] = n.attr["native_segment"].func.name
            elif n.op in ("PartitionedCall", "StatefulPartitionedCall") and \
                    n.attr["_XlaMustCompile"].b and backend in (None, "xla"):
                found[n.name] = n.attr["f"].func.name
    return found


def assert_ran_each(stats: dict, model_dir, tags=None) -> None:
    """A model with segments on both backends: every segment ran on its own backend."""
    openvino = fused_segments(model_dir, tags, "openvino")
    xla = fused_segments(model_dir, tags, "xla")
    assert openvino and xla, f"not a mixed model: {openvino} {xla}"
    assert_ran(stats, "openvino", openvino)
    assert_ran({**stats, "ops": {}}, "xla", xla)


def _cluster_function(cluster: str) -> str:
    """XLA names a cluster after its function; TF2's loader renames functions
    `__inference_<name>_<k>`."""
    match = re.fullmatch(r"__inference_(.+)_\d+", cluster)
    return match.group(1) if match else cluster


def assert_ran(stats: dict, backend: str, segments, path="compiled", reason=None):
    """Proves which path ran, from fuseflow.runtime_stats() (or a fuseflow.runtime.since()
    delta) of the process that ran the model.

    segments: fused node names, or fused_segments()'s {name: function}; empty for a
    model that must run entirely in TF. OpenVINO: exactly these fused ops ran, every
    call on `path` ("compiled", "recompiled" or "fallback", the latter for `reason`'s
    kind when given; or a {segment: path} dict). XLA: no FuseflowOp ran, and XLA
    compiled every segment's function as a cluster and launched at least one; with no
    segments, XLA launched nothing.
    """
    assert backend in ("openvino", "xla"), backend
    ops = stats["ops"]
    if backend == "openvino":
        names = sorted(segments)
        assert sorted(ops) == names, f"fused ops that ran {sorted(ops)} != {names}: {stats}"
        paths = path if isinstance(path, dict) else dict.fromkeys(names, path)
        for name in names:
            op, want = ops[name], paths[name]
            other = {p: op[p] for p in ("compiled", "recompiled", "fallback") if p != want}
            assert op[want] >= 1 and not any(other.values()), \
                f"{name}: expected every call on the {want} path: {op}"
            if want == "fallback" and reason is not None:
                assert set(op["fallback_reasons"]) == {reason}, op
        return
    assert not ops, f"FuseflowOps ran on the XLA backend: {ops}"
    xla = stats["xla"]
    compiled = {_cluster_function(c) for c in xla["clusters"]}
    functions = set(segments.values()) if isinstance(segments, dict) else None
    if not segments:
        assert xla["launches"] == 0 and not compiled, f"XLA ran a cluster: {xla}"
        return
    assert xla["launches"] >= 1, f"XLA launched nothing: {xla}"
    if functions is not None:
        assert functions <= compiled, f"XLA did not compile {functions - compiled}: {xla}"
    else:
        assert len(compiled) >= len(segments), f"XLA compiled {compiled}, not {segments}"


@contextlib.contextmanager
def ran_in_process():
    """`with ran_in_process() as ran: ...; assert_ran(ran.stats, ...)`: the runtime stats
    of the calls made inside the block in this process."""
    from fuseflow.runtime import runtime_stats, since

    class Ran:
        stats: dict = {}

    ran, before = Ran(), runtime_stats()
    yield ran
    ran.stats = since(before)


def assert_outputs_close(expected: dict, actual: dict, rtol=1e-4, atol=1e-5):
    assert sorted(expected) == sorted(actual)
    for k in expected:
        if np.asarray(expected[k]).dtype.kind in "SUO":
            np.testing.assert_array_equal(np.asarray(actual[k]).astype("S"),
                                          np.asarray(expected[k]).astype("S"), err_msg=k)
        else:
            np.testing.assert_allclose(actual[k], expected[k], rtol=rtol, atol=atol, err_msg=k)


def saved_graph(model_dir):
    """The GraphDef (with library) of a SavedModel's only MetaGraphDef."""
    from fuseflow.load import read_saved_model_proto

    proto = read_saved_model_proto(str(model_dir))
    assert len(proto.meta_graphs) == 1
    return proto.meta_graphs[0].graph_def


def fused_blob(model_dir, node) -> Path:
    """The asset file holding a FuseflowOp node's OpenVINO blob."""
    from fuseflow.assets import BLOB_SUFFIX, file_name

    key = node.attr["executable_file"].s.decode()
    assert key and not node.attr["executable"].s, "the blob should be an asset, not an attr"
    path = Path(model_dir) / "assets" / file_name(key, BLOB_SUFFIX)
    assert path.is_file(), path
    return path


def op_types(graph_def) -> list[str]:
    return [n.op for n in graph_def.node]


@pytest.fixture(scope="module", autouse=True)
def _module_compile_cache(tmp_path_factory):
    """Module-scoped fixtures compile too, before any function-scoped fixture: they get an
    empty cache of their module's, never the user's ~/.cache/fuseflow."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FUSEFLOW_CACHE_DIR", str(tmp_path_factory.mktemp("module-cache")))
        yield


@pytest.fixture(autouse=True)
def _own_compile_cache(tmp_path_factory, monkeypatch):
    """Every test compiles against an empty compile cache of its own: a segment another
    test compiled must not skip the compiler (and the faults injected into it)."""
    monkeypatch.setenv("FUSEFLOW_CACHE_DIR", str(tmp_path_factory.mktemp("compile-cache")))


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(params=["openvino", "xla"])
def backend(request):
    """Every end-to-end test runs once per backend."""
    return request.param
