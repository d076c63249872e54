"""The wheel route: `pip wheel .` of a clean copy of the sources, installed into a fresh
venv and used from outside the source tree, compiles a model, runs it and serves it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

pytestmark = pytest.mark.slow

# Run by the installed fuseflow in the fresh venv, with cwd outside the source tree.
_COMPILE_AND_RUN = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tensorflow as tf
    import fuseflow

    graph = tf.Graph()
    with graph.as_default(), tf.compat.v1.Session(graph=graph) as sess:
        x = tf.compat.v1.placeholder(tf.float32, [None, 8], name="x")
        w = tf.constant(np.linspace(-1, 1, 8 * 4, dtype=np.float32).reshape(8, 4))
        y = tf.nn.relu(tf.matmul(x, w) + 0.5) * 2.0
        sig = tf.compat.v1.saved_model.predict_signature_def({"x": x}, {"y": y})
        builder = tf.compat.v1.saved_model.Builder("model")
        builder.add_meta_graph_and_variables(sess, ["serve"], {"serving_default": sig})
        builder.save()
    fuseflow.saved_model.compile("model", "compiled/1", batch_size=2)
    feed = np.arange(16, dtype=np.float32).reshape(2, 8) / 10
    want = tf.saved_model.load("model").signatures["serving_default"](x=tf.constant(feed))
    before = fuseflow.runtime_stats()
    got = tf.saved_model.load("compiled/1").signatures["serving_default"](x=tf.constant(feed))
    ran = fuseflow.runtime.since(before)["ops"]
    np.testing.assert_allclose(got["y"].numpy(), want["y"].numpy(), rtol=1e-4, atol=1e-5)
    json.dump({"fuseflow": fuseflow.__file__, "ops": ran}, sys.stdout)
""")


def _run(args, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, **kwargs)
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """`pip wheel .` (build isolation on) of the files git would commit, nothing built."""
    root = tmp_path_factory.mktemp("wheel")
    files = _run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO).stdout.split()
    for name in files:
        if (REPO / name).is_file():
            (root / "src" / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / "src" / name)
    assert not list((root / "src/fuseflow/native").glob("*.so"))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", root / "dist",
          root / "src"], timeout=1200)
    (built,) = (root / "dist").glob("fuseflow-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh venv with the wheel (and its serve extra) installed, and TF Serving's gRPC
    protos without their `tensorflow` requirement, as the README's wheel route does."""
    from fuseflow.serve.grpcapi import PROTOS

    root = tmp_path_factory.mktemp("venv")
    python = shutil.which("python3.11") or sys.executable
    _run([python, "-m", "venv", root / "venv"], timeout=300)
    _run([root / "venv/bin/python", "-m", "pip", "install", "-q", f"{wheel}[serve]"],
         timeout=1200)
    _run([root / "venv/bin/python", "-m", "pip", "install", "-q", "--no-deps", PROTOS],
         timeout=600)
    return root / "venv"


def test_wheel_holds_the_native_op_and_is_platform_tagged(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "fuseflow/native/_fuseflow_op.so" in names
    assert "fuseflow/native/_fuseflow_op.stamp" in names
    assert "fuseflow/native/fuseflow_op.cc" in names  # the stamp is checked against these
    assert not wheel.name.endswith("-any.whl"), wheel.name


@pytest.fixture(scope="module")
def outside(venv, tmp_path_factory):
    """The installed fuseflow compiles and runs a model with cwd outside the source tree."""
    cwd = tmp_path_factory.mktemp("outside")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    proc = _run([venv / "bin/python", "-c", _COMPILE_AND_RUN], cwd=cwd, env=env, timeout=900)
    return cwd, env, json.loads(proc.stdout)


def test_installed_wheel_compiles_and_runs_outside_the_source_tree(venv, outside):
    cwd, _, result = outside
    assert result["fuseflow"].startswith(str(venv)), result  # the installed copy, not REPO
    ops = result["ops"]
    assert ops and all(op["compiled"] >= 1 and not op["fallback"] for op in ops.values()), ops
    assert (cwd / "compiled/1/saved_model.pb").exists()
    # the shipped library was used as it is: its stamp matched, nothing was rebuilt
    site = Path(result["fuseflow"]).parent / "native"
    assert not (site / "_fuseflow_op.lock").exists()


def test_installed_wheel_serves(venv, outside):
    """`fuseflow serve` of the installed wheel answers a TF Serving predict request."""
    from bench.serve_process import ServeProcess

    cwd, env, _ = outside
    with ServeProcess([venv / "bin/fuseflow", "serve", "--model", f"m={cwd / 'compiled'}"],
                      cwd=cwd, env=env) as server:
        feed = (np.arange(16, dtype=np.float32).reshape(2, 8) / 10).tolist()
        status, body = server.post("/v1/models/m:predict", {"instances": feed})
        assert status == 200, body
        assert np.asarray(body["predictions"]).shape == (2, 4)
        stats = server.get("/fuseflow/stats/m")[1]["runtime"]["ops"]
        assert stats and all(op["compiled"] >= 1 for op in stats.values()), stats
