"""Real model architectures (random weights) exported as SavedModels for demo and bench."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fuseflow.tf_compat import tf


@dataclass(frozen=True)
class BenchModel:
    name: str
    build: Callable[[], object]  # -> keras.Model
    feed: Callable[[int, np.random.Generator], np.ndarray]  # batch -> input


def _image(size: int):
    return lambda batch, rng: rng.random((batch, size, size, 3), np.float32) * 255.0


def bert_like(seq: int = 128, layers: int = 4, dim: int = 256, heads: int = 4,
              vocab: int = 8000):
    """A BERT-style encoder: embeddings, post-LN attention blocks, a pooled head."""
    ids = tf.keras.Input((seq,), dtype="int32", name="input_ids")
    pos = tf.keras.layers.Embedding(seq, dim)(tf.range(seq)[tf.newaxis])
    x = tf.keras.layers.Embedding(vocab, dim)(ids) + pos
    x = tf.keras.layers.LayerNormalization(epsilon=1e-12)(x)
    for _ in range(layers):
        att = tf.keras.layers.MultiHeadAttention(heads, dim // heads)(x, x)
        x = tf.keras.layers.LayerNormalization(epsilon=1e-12)(x + att)
        ff = tf.keras.layers.Dense(dim * 4, activation="gelu")(x)
        x = tf.keras.layers.LayerNormalization(epsilon=1e-12)(x + tf.keras.layers.Dense(dim)(ff))
    pooled = tf.keras.layers.Dense(dim, activation="tanh")(x[:, 0])
    return tf.keras.Model(ids, tf.keras.layers.Dense(2)(pooled))


def crnn(height: int = 32, width: int = 128, classes: int = 40, units: int = 128):
    """An OCR-style CRNN: a convolutional feature extractor, a bidirectional LSTM over
    the columns, a dense head per step. Its convolutions run best on OpenVINO, its loops
    on XLA."""
    image = tf.keras.Input((height, width, 1), name="image")
    x = image
    for filters, pool in ((32, (2, 2)), (64, (2, 2)), (128, (2, 1))):
        x = tf.keras.layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
        x = tf.keras.layers.MaxPool2D(pool)(x)
    steps, rows = width // 4, height // 8
    x = tf.keras.layers.Permute((2, 1, 3))(x)
    x = tf.keras.layers.Reshape((steps, rows * 128))(x)
    x = tf.keras.layers.Bidirectional(tf.keras.layers.LSTM(units, return_sequences=True))(x)
    return tf.keras.Model(image, tf.keras.layers.Dense(classes, activation="softmax")(x))


def tiny_mlp():
    """16 -> 32 -> 4: a model whose per-call overhead outweighs its arithmetic."""
    x = tf.keras.Input((16,), name="x")
    hidden = tf.keras.layers.Dense(32, activation="relu")(x)
    return tf.keras.Model(x, tf.keras.layers.Dense(4)(hidden))


MODELS = {
    "MobileNetV2": BenchModel(
        "MobileNetV2", lambda: tf.keras.applications.MobileNetV2(
            weights=None, classifier_activation=None), _image(224)),
    "ResNet50": BenchModel(
        "ResNet50", lambda: tf.keras.applications.ResNet50(
            weights=None, classifier_activation=None), _image(224)),
    "EfficientNetB0": BenchModel(
        "EfficientNetB0", lambda: tf.keras.applications.EfficientNetB0(
            weights=None, classifier_activation=None),
        _image(224)),
    "BERT-like": BenchModel(
        "BERT-like", bert_like,
        lambda batch, rng: rng.integers(0, 8000, (batch, 128)).astype(np.int32)),
    "CRNN": BenchModel(
        "CRNN", crnn, lambda batch, rng: rng.random((batch, 32, 128, 1), np.float32)),
    "TinyMLP": BenchModel(
        "TinyMLP", tiny_mlp, lambda batch, rng: rng.random((batch, 16), np.float32)),
}


def export(model: BenchModel, directory: Path) -> tuple[Path, str]:
    """Export with Keras' model.export; returns the path and the signature's input key."""
    tf.keras.utils.set_random_seed(0)
    keras_model = model.build()
    path = directory / model.name
    keras_model.export(str(path), verbose=False)
    return path, keras_model.inputs[0].name


def timed_signature(model_dir: Path):
    """The serving signature as a callable; loading here keeps the model alive."""
    loaded = tf.saved_model.load(str(model_dir))
    fn = loaded.signatures["serving_default"]

    def call(**feeds):
        return fn(**feeds)

    call.loaded = loaded
    return call


def median_latency_ms(call, feeds: dict, warmup: int = 5, runs: int = 30) -> float:
    import time

    tensors = {k: tf.constant(v) for k, v in feeds.items()}
    for _ in range(warmup):
        call(**tensors)
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        out = call(**tensors)
        for v in out.values():
            v.numpy()
        samples.append(time.perf_counter() - start)
    return 1000 * float(np.median(samples))
