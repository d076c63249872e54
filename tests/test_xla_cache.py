"""XLA segments start warm: the compile ships XLA's executables in the model's assets,
and a fresh process that imports fuseflow loads them instead of compiling.

Proof of the path is TF's own counter of executables loaded from the persistent cache
(runtime_stats()["xla"]["cache_loads"]), never a timing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import (
    REPO,
    assert_outputs_close,
    assert_ran,
    fused_segments,
    run_fresh,
    save_tf1,
    tf,
)

import fuseflow
from fuseflow import xla_cache


def _model():
    x = tf.compat.v1.placeholder(tf.float32, [None, 32], name="x")
    w = tf.constant(np.random.default_rng(0).normal(size=(32, 32)).astype(np.float32))
    h = tf.nn.relu(tf.matmul(x, w) + 1.0)
    return {"x": x}, {"y": tf.tanh(tf.matmul(h, w * 0.1), name="y")}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    root = tmp_path_factory.mktemp("xla-cache")
    src = save_tf1(root / "m", _model)
    fuseflow.saved_model.compile(str(src), str(root / "c"), backend="xla",
                                 compiler_args=["--no-profile", "--xla-cache"])
    feeds = {"x": np.random.default_rng(1).random((1, 32), np.float32)}
    loaded = tf.saved_model.load(str(src)).signatures["serving_default"]
    expected = {k: v.numpy() for k, v in loaded(x=tf.constant(feeds["x"])).items()}
    return root / "c", feeds, expected


def _entries(folder):
    return sorted(p.name for p in folder.glob("*.pb")) if folder.is_dir() else []


def test_assets_hold_executables_for_this_cpu(compiled):
    model, _, _ = compiled
    shipped = _entries(model / "assets" / xla_cache.ASSETS_DIR)
    # One per loader: TF2's renames the functions, the TF1 session (and C++) keeps them.
    assert len(shipped) == 2, shipped
    assert all(name.startswith(xla_cache.cpu_prefix() + "__") for name in shipped)
    report = (model / "assets.extra" / "fuseflow_report.json").read_text()
    assert xla_cache.cpu_prefix() in report and "tf_xla_persistent_cache_read_only" in report


_BOTH_LOADERS = textwrap.dedent("""
    import json, sys
    import numpy as np
    import fuseflow
    import tensorflow as tf
    model, x, out = sys.argv[1:]
    x = np.load(x)
    fn = tf.saved_model.load(model).signatures["serving_default"]  # first: see timing.py
    v2 = fn(x=tf.constant(x))["y"].numpy()
    with tf.Graph().as_default() as g, tf.compat.v1.Session(graph=g) as sess:
        sig = tf.compat.v1.saved_model.load(sess, ["serve"], model).signature_def[
            "serving_default"]
        v1 = sess.run(sig.outputs["y"].name, {sig.inputs["x"].name: x})
    json.dump({"v2": v2.tolist(), "v1": v1.tolist(), "stats": fuseflow.runtime_stats()},
              open(out, "w"))
""")


def test_fresh_process_loads_executables_instead_of_compiling(compiled, tmp_path):
    """TF2's loader, then a TF1 session (the C++ loader's path) in one fresh process."""
    model, feeds, expected = compiled
    np.save(tmp_path / "x.npy", feeds["x"])
    subprocess.run([sys.executable, "-c", _BOTH_LOADERS, str(model), str(tmp_path / "x.npy"),
                    str(tmp_path / "out.json")], check=True, cwd=REPO,
                   env={**os.environ, "FUSEFLOW_CACHE_DIR": str(tmp_path / "cache")})
    result = json.loads((tmp_path / "out.json").read_text())
    for api in ("v2", "v1"):
        assert_outputs_close(expected, {"y": np.array(result[api], np.float32)})
    stats = result["stats"]
    assert_ran(stats, "xla", fused_segments(model))
    xla = stats["xla"]
    # XLA lowered each cluster to HLO (once per loader) and took every executable from
    # the cache: none was built.
    assert xla["compilations"] == 2 and xla["cache_loads"] == 2, xla
    installed = _entries(tmp_path / "cache" / "xla")
    assert installed == _entries(model / "assets" / xla_cache.ASSETS_DIR)


def test_another_cpu_misses_and_compiles(compiled, tmp_path):
    """A prefix other than the compiling CPU's (another CPU or TF version) finds nothing
    to load: XLA compiles as without a cache, and keeps its own executable."""
    model, feeds, expected = compiled
    own = tmp_path / "other-cpu"
    flags = xla_cache.serving_flags(own, prefix="fuseflow_othercpu")
    outputs, stats = run_fresh(model, feeds, tmp_path, with_stats=True,
                               env={"TF_XLA_FLAGS": flags, "FUSEFLOW_XLA_FLAGS": ""})
    assert_outputs_close(expected, outputs)
    assert_ran(stats, "xla", fused_segments(model))
    assert stats["xla"]["cache_loads"] == 0 and stats["xla"]["compilations"] >= 1
    written = _entries(own)
    assert written and all(n.startswith("fuseflow_othercpu__") for n in written), written


def test_import_appends_to_the_users_flags_and_keeps_their_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("FUSEFLOW_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("TF_XLA_FLAGS", "--tf_xla_async_compilation=false")
    monkeypatch.delenv("FUSEFLOW_XLA_FLAGS", raising=False)
    xla_cache.configure_process()
    flags = os.environ["TF_XLA_FLAGS"]
    assert flags.startswith("--tf_xla_async_compilation=false ")
    assert f"--tf_xla_persistent_cache_directory={tmp_path / 'xla'}" in flags
    assert f"--tf_xla_persistent_cache_prefix={xla_cache.cpu_prefix()}" in flags
    # A child process with another cache dir redoes fuseflow's part, not the user's.
    monkeypatch.setenv("FUSEFLOW_CACHE_DIR", str(tmp_path / "child"))
    xla_cache.configure_process()
    flags = os.environ["TF_XLA_FLAGS"]
    assert flags.count("persistent_cache_directory") == 1 and str(tmp_path / "child") in flags
    # The user's own cache directory is theirs.
    mine = "--tf_xla_persistent_cache_directory=/srv/xla"
    monkeypatch.setenv("TF_XLA_FLAGS", mine)
    monkeypatch.delenv("FUSEFLOW_XLA_FLAGS", raising=False)
    xla_cache.configure_process()
    assert os.environ["TF_XLA_FLAGS"] == mine


def test_cpp_loader_reads_the_shipped_executables_with_stock_flags(compiled, monkeypatch):
    """TF's C++ LoadSavedModel (TF Serving's loader), no fuseflow Python: the flags the
    report names, pointed read-only at the model's assets, are all it takes."""
    from cpp_runner import run_saved_model_cpp

    from fuseflow.native import library_path

    model, feeds, expected = compiled
    monkeypatch.setenv("TF_XLA_FLAGS", xla_cache.serving_flags(
        model / "assets" / xla_cache.ASSETS_DIR, read_only=True))
    # The op library only counts here (the model has no FuseflowOp): runtime stats.
    outputs, stats = run_saved_model_cpp(model, feeds, op_libs=[library_path()],
                                         with_stats=True)
    assert_outputs_close(expected, outputs)
    assert stats["xla"]["compilations"] == 1 and stats["xla"]["cache_loads"] == 1, stats


def test_per_user_cache_is_trimmed_oldest_first(tmp_path):
    sizes = {"a": 400, "b": 300, "c": 200}  # a oldest
    for k, (name, size) in enumerate(sizes.items()):
        path = tmp_path / f"{name}.pb"
        path.write_bytes(b"x" * size)
        os.utime(path, (1000 + k, 1000 + k))
    (tmp_path / "keep.txt").write_bytes(b"x" * 5000)  # not an executable: never touched
    assert xla_cache.trim(tmp_path, limit_bytes=600) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.pb", "c.pb", "keep.txt"]
    assert xla_cache.trim(tmp_path, limit_bytes=600) == 0


def test_recompile_ships_the_executables_from_the_compile_cache(tmp_path, monkeypatch):
    """The same graph compiled again: its executables come from the compile cache, with no
    run of the model to build them, and a fresh process still loads every one."""
    monkeypatch.setenv("FUSEFLOW_CACHE_DIR", str(tmp_path / "compile-cache"))
    src = save_tf1(tmp_path / "m", _model)
    for out in ("c1", "c2"):
        fuseflow.saved_model.compile(str(src), str(tmp_path / out), backend="xla",
                                     compiler_args=["--no-profile", "--xla-cache"])
    first, second = (json.loads((tmp_path / out / "assets.extra" / "fuseflow_report.json")
                                .read_text()) for out in ("c1", "c2"))
    assert "source" not in first["runtime"]["xla_cache"]
    assert second["runtime"]["xla_cache"]["source"] == "cache", second["runtime"]
    shipped = [_entries(tmp_path / out / "assets" / xla_cache.ASSETS_DIR)
               for out in ("c1", "c2")]
    assert shipped[0] == shipped[1] and len(shipped[0]) == 2, shipped
    x = np.random.default_rng(1).random((1, 32), np.float32)
    np.save(tmp_path / "x.npy", x)
    subprocess.run([sys.executable, "-c", _BOTH_LOADERS, str(tmp_path / "c2"),
                    str(tmp_path / "x.npy"), str(tmp_path / "out.json")], check=True, cwd=REPO,
                   env={**os.environ, "FUSEFLOW_CACHE_DIR": str(tmp_path / "user-cache")})
    stats = json.loads((tmp_path / "out.json").read_text())["stats"]
    assert stats["xla"]["compilations"] == 2 and stats["xla"]["cache_loads"] == 2, stats
