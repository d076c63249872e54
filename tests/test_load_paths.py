"""The two ways a SavedModel is frozen give the same graph.

A TF2 model is frozen without a session: its variables are read from the
checkpoint through the object graph (load._freeze_from_checkpoint). Anything that
path does not follow goes through TF's v1 loader and a session
(load._freeze_in_session), as every model did before. Each family here must take the
first path and give, node for node, what the second gives.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2
from test_load_tf2_wrappers import _save as save_module_around_keras

from fuseflow import load
from fuseflow.cache import canonical
from fuseflow.graph_util import count_ops, node_name

sys.path.insert(0, str(Path(__file__).parent / "zoo"))
from families import ZOO  # noqa: E402

# A loop (LSTM), a conditional, a tf.Module around Keras, embeddings, a position table
# over 64 KB; the Keras-3-in-a-module export whose v1 restore leaves handles unbound.
FAMILIES = ["LSTM text", "tf.Module cond", "detector+NMS", "recommender", "BERT-like"]


def _both_paths(model_dir: str):
    proto = load.read_saved_model_proto(model_dir)
    tags, meta_graph = load.select_meta_graph(proto, None)
    key = load.select_signature(meta_graph, None)
    sig = meta_graph.signature_def[key]
    io = sorted({node_name(t.tensor_name)
                 for t in load._specs(sig.inputs) + load._specs(sig.outputs)})
    return (load._freeze_from_checkpoint(model_dir, meta_graph, io),
            load._freeze_in_session(model_dir, tags, key, sig, meta_graph, io))


def _assert_same(fast, session):
    assert fast is not None, "the model went through a session"
    used, frozen, values, init_nodes = fast
    assert canonical(frozen) == canonical(session[1])
    assert count_ops(used) == count_ops(session[0])
    assert sorted(values) == sorted(session[2]) and init_nodes == session[3] == []
    for name, value in values.items():
        np.testing.assert_array_equal(value, session[2][name])


@pytest.mark.parametrize("family", FAMILIES)
def test_tf2_families_freeze_without_a_session_as_with_one(tmp_path, family):
    ZOO[family].build(tmp_path / "model")
    _assert_same(*_both_paths(str(tmp_path / "model")))


@pytest.mark.parametrize("freeze_limit_mb", [None, "0.0001"])
def test_unbound_handles_and_unfrozen_variables(tmp_path, monkeypatch, freeze_limit_mb):
    """The checkpoint path reads the handles the signature captures, not the ones TF1's
    restore writes; variables over the freeze budget come back as values, unfrozen."""
    if freeze_limit_mb:
        monkeypatch.setenv("FUSEFLOW_FREEZE_LIMIT_MB", freeze_limit_mb)
    fast, session = _both_paths(str(save_module_around_keras(tmp_path / "model")))
    _assert_same(fast, session)
    assert bool(fast[2]) == bool(freeze_limit_mb)


def test_table_initializers_go_through_a_session(tmp_path):
    """Their init op runs at load, so a missing asset is reported there."""
    ZOO["TF1 Example+table"].build(tmp_path / "model")
    fast, session = _both_paths(str(tmp_path / "model"))
    assert fast is None and session[3]


def test_a_handle_the_object_graph_does_not_bind_goes_through_a_session(tmp_path):
    """The checkpoint path reads only what it can bind; TF1's restore loads the rest."""
    class Partly(tf.Module):
        def __init__(self):
            super().__init__()
            self.w = tf.Variable(tf.ones([4, 2]))

        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32)])
        def __call__(self, x):
            return {"y": tf.matmul(x, self.w)}

    module = Partly()
    tf.saved_model.save(module, str(tmp_path / "model"),
                        signatures={"serving_default": module.__call__})
    fast, _ = _both_paths(str(tmp_path / "model"))
    assert fast is not None
    # The same model, its signature's function bound to no object.
    pb = tmp_path / "model" / "saved_model.pb"
    proto = saved_model_pb2.SavedModel.FromString(pb.read_bytes())
    objects = proto.meta_graphs[0].object_graph_def
    for concrete in objects.concrete_functions.values():
        del concrete.bound_inputs[:]
    pb.write_bytes(proto.SerializeToString())
    fast, session = _both_paths(str(tmp_path / "model"))
    assert fast is None and session is not None
