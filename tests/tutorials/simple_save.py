# tensorflow-neuron 1.x's saved_model.simple_save, used as its documentation shows:
# a TF1 session graph saved (and compiled) in one call, then served with TF1's loader.
# Changed: the import line; tf.compat.v1 spells TF1's names in TF 2.x.
import shutil

import numpy as np
import tensorflow as tf

import fuseflow as tfn

tf.compat.v1.disable_eager_execution()
export_dir = './simple_save_neuron'
shutil.rmtree(export_dir, ignore_errors=True)

with tf.compat.v1.Session(graph=tf.Graph()) as sess:
    x = tf.compat.v1.placeholder(tf.float32, [None, 8, 8, 3], name='x')
    kernel = tf.compat.v1.get_variable('kernel', [3, 3, 3, 4])
    conv = tf.nn.conv2d(x, kernel, strides=[1, 1, 1, 1], padding='SAME')
    y = tf.nn.relu(conv + 0.1, name='y')
    sess.run(tf.compat.v1.global_variables_initializer())
    x_value = np.random.default_rng(0).random((1, 8, 8, 3)).astype(np.float32)
    y_ref = sess.run(y, {x: x_value})
    tfn.saved_model.simple_save(sess, export_dir, {'x': x}, {'y': y})

with tf.compat.v1.Session(graph=tf.Graph()) as sess:
    tf.compat.v1.saved_model.loader.load(sess, ['serve'], export_dir)
    y_neuron = sess.run('y:0', {'x:0': x_value})
    assert 'FuseflowOp' in [op.type for op in sess.graph.get_operations()]

np.testing.assert_allclose(y_neuron, y_ref, rtol=1e-4, atol=1e-5)
print('simple_save ok')
