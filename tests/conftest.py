"""Shared helpers: build real SavedModels, compile them, run them in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
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
""")


def run_fresh(model_dir, feeds: dict, tmp_path: Path, signature="serving_default", tags=None,
              api="v2", env=None, with_log=False):
    """Load and run a (compiled) model in a new Python process that imports fuseflow.

    Returns the outputs, or (outputs, stderr) with with_log.
    """
    feeds_file, out_file = tmp_path / "feeds.npz", tmp_path / "out.npz"
    np.savez(feeds_file, **feeds)
    args = {"model": str(model_dir), "feeds": str(feeds_file), "out": str(out_file),
            "signature": signature, "tags": list(tags) if tags else None, "api": api,
            "repeat": 1}
    proc = subprocess.run([sys.executable, "-c", _FRESH, json.dumps(args)], cwd=REPO,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})
    assert proc.returncode == 0, f"fresh process failed:\n{proc.stderr[-4000:]}"
    with np.load(out_file) as data:
        outputs = dict(data)
    return (outputs, proc.stderr) if with_log else outputs


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


def op_types(graph_def) -> list[str]:
    return [n.op for n in graph_def.node]


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(params=["openvino", "xla"])
def backend(request):
    """Every end-to-end test runs once per backend."""
    return request.param
