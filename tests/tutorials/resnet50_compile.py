# tensorflow-neuron's "ResNet50 on Inferentia" TF1 tutorial (compile_resnet50.py and
# infer_resnet50.py), re-typed from its documentation. Changed: the import line
# (fuseflow for tensorflow.neuron), and what TF 2.21 / Keras 3 no longer have:
# keras.backend.get_session()/set_learning_phase (the export is model.export),
# tf.contrib.predictor (the compiled model is loaded with tf.saved_model.load),
# weights='imagenet' (weights=None: nothing is downloaded) and a 32x32 input so the
# test stays fast. The calls into the compiler are the tutorial's.
import os
import shutil

import numpy as np
import tensorflow as tf
from tensorflow.keras.applications.resnet50 import ResNet50

import fuseflow as tfn

# Create a workspace
WORKSPACE = './ws_resnet50'
os.makedirs(WORKSPACE, exist_ok=True)

# Prepare export directory (old one removed)
model_dir = os.path.join(WORKSPACE, 'resnet50')
compiled_model_dir = os.path.join(WORKSPACE, 'resnet50_neuron')
shutil.rmtree(model_dir, ignore_errors=True)
shutil.rmtree(compiled_model_dir, ignore_errors=True)

# Instantiate Keras ResNet50 model
model = ResNet50(weights=None, input_shape=(32, 32, 3), classes=10)

# Export SavedModel
model.export(model_dir)

# Compile using Neuron
tfn.saved_model.compile(model_dir, compiled_model_dir)

# Prepare SavedModel for uploading to Inf1 instance
shutil.make_archive(compiled_model_dir, 'zip', WORKSPACE, 'resnet50_neuron')

# infer_resnet50.py: run the compiled model, compare with the original
img_arr3 = np.random.default_rng(0).random((1, 32, 32, 3)).astype(np.float32)
predictor = tf.saved_model.load(compiled_model_dir).signatures['serving_default']
infa_rslts = list(predictor(tf.constant(img_arr3)).values())[0].numpy()
np.testing.assert_allclose(infa_rslts, model(img_arr3).numpy(), rtol=1e-3, atol=1e-4)
print('resnet50 ok', infa_rslts.shape)
