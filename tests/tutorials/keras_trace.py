# tensorflow-neuron 2.x's tfn.trace example (its Python tracing API page), re-typed.
# Changed: the import line, and for Keras 3: Input takes a shape tuple, and Keras 3
# reloads only .keras files, so the SavedModel directory is reloaded with
# tf.saved_model.load.
import numpy as np
import tensorflow as tf

import fuseflow as tfn

input0 = tf.keras.layers.Input((3,))
dense0 = tf.keras.layers.Dense(3)(input0)
model = tf.keras.Model(inputs=[input0], outputs=[dense0])
example_inputs = tf.random.uniform([1, 3])
model_neuron = tfn.trace(model, example_inputs)  # trace

model_dir = './model_neuron'
model_neuron.save(model_dir)
model_neuron_reloaded = tf.saved_model.load(model_dir)

print(model_neuron.on_neuron_ratio)
np.testing.assert_allclose(model_neuron_reloaded(example_inputs).numpy(),
                           model(example_inputs).numpy(), rtol=1e-4, atol=1e-5)
print('trace ok')
