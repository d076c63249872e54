"""Models whose weights would push the GraphDef past protobuf's 2 GB stay loadable:
the largest variables are kept as variables instead of frozen constants."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_outputs_close, run_fresh, run_saved_model, save_tf1, tf
from test_compile_core import compile_model


def _embedding_model(rows: int, dim: int):
    def build():
        ids = tf.compat.v1.placeholder(tf.int32, [None, 4], name="ids")
        x = tf.compat.v1.placeholder(tf.float32, [None, dim], name="x")
        table = tf.compat.v1.get_variable(
            "table", [rows, dim], initializer=tf.compat.v1.random_uniform_initializer())
        small = tf.compat.v1.get_variable("small", [dim, dim])
        emb = tf.reduce_sum(tf.gather(table, ids), axis=1)
        return {"ids": ids, "x": x}, {"y": tf.nn.relu(tf.matmul(emb + x, small)) * 2.0}
    return build


def test_large_variables_are_kept_out_of_the_graph(backend, tmp_path, monkeypatch, rng):
    src = save_tf1(tmp_path / "m", _embedding_model(4096, 64))  # 1 MB table
    monkeypatch.setenv("FUSEFLOW_FREEZE_LIMIT_MB", "0.5")
    result = compile_model(backend, src, tmp_path / "c", batch_size=2)
    assert result["num_segments"] >= 1
    pb = (tmp_path / "c" / "saved_model.pb").stat().st_size
    assert pb < 600_000, pb  # the 1 MB table is not in the graph (twice, or at all)
    assert (tmp_path / "c" / "variables" / "variables.index").exists()
    feeds = {"ids": rng.integers(0, 4096, (2, 4)).astype(np.int32),
             "x": rng.random((2, 64), np.float32)}
    assert_outputs_close(run_saved_model(src, feeds),
                         run_fresh(tmp_path / "c", feeds, tmp_path, backend=backend))


@pytest.mark.slow
def test_model_over_2gb_compiles_and_runs(tmp_path, rng):
    rows = 8_400_000  # x 64 floats = 2.15 GB
    src = save_tf1(tmp_path / "m", _embedding_model(rows, 64))
    compile_model("openvino", src, tmp_path / "c", batch_size=2)
    feeds = {"ids": rng.integers(0, rows, (2, 4)).astype(np.int32),
             "x": rng.random((2, 64), np.float32)}
    assert_outputs_close(run_saved_model(src, feeds),
                         run_fresh(tmp_path / "c", feeds, tmp_path, backend="openvino"))
