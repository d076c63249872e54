"""One builder per model family, from code with random weights, saved as a SavedModel.

Each builder writes a SavedModel to a folder and returns the feeds (signature input key
-> array at batch 1) the zoo runs it with. Sizes are the smallest each architecture
allows, so that the whole zoo compiles in minutes on two cores; the structure (op types,
control flow, constant operands, string/table plumbing) is the real one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf

keras = tf.keras


@dataclass(frozen=True)
class ZooModel:
    name: str
    family: str
    build: Callable[[Path], dict[str, np.ndarray]]  # saves the model, returns feeds
    batch_size: int = 1
    fast: bool = False  # part of `make test`; the rest runs in `make zoo`


def _rng() -> np.random.Generator:
    return np.random.default_rng(0)


def _export_keras(model, path: Path, specs: list[tf.TensorSpec]) -> None:
    """A serving_default signature with input keys we name (model.export would call
    them keras_tensor_N)."""
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serving_default", model,
                         input_signature=specs if len(specs) == 1 else [specs])
    archive.write_out(str(path), verbose=False)


def _keras_image(app: str, size: int, **kwargs) -> Callable[[Path], dict]:
    def build(path: Path) -> dict:
        keras.utils.set_random_seed(0)
        model = getattr(keras.applications, app)(
            weights=None, input_shape=(size, size, 3), classifier_activation=None, **kwargs)
        _export_keras(model, path, [tf.TensorSpec([None, size, size, 3], tf.float32, "image")])
        return {"image": _rng().random((1, size, size, 3), np.float32) * 255.0}
    return build


# The smallest variant of every keras.applications family, at its smallest input size.
IMAGE_MODELS = [
    ("VGG16", 32), ("ResNet50", 32), ("ResNet50V2", 32), ("Xception", 71),
    ("InceptionV3", 75), ("InceptionResNetV2", 75), ("MobileNet", 32), ("MobileNetV2", 32),
    ("MobileNetV3Small", 32), ("DenseNet121", 32), ("NASNetMobile", 32),
    ("EfficientNetB0", 32), ("EfficientNetV2B0", 32), ("ConvNeXtTiny", 32),
]


def _transformer_block(x, dim: int, heads: int):
    att = keras.layers.MultiHeadAttention(heads, dim // heads)(x, x)
    x = keras.layers.LayerNormalization(epsilon=1e-6)(x + att)
    ff = keras.layers.Dense(dim * 4, activation="gelu")(x)
    return keras.layers.LayerNormalization(epsilon=1e-6)(x + keras.layers.Dense(dim)(ff))


def _embedded_tokens(seq: int, dim: int, vocab: int):
    """Token ids in, token plus position embeddings out."""
    keras.utils.set_random_seed(0)
    ids = keras.Input((seq,), dtype="int32")
    x = keras.layers.Embedding(vocab, dim)(ids)
    return ids, x + keras.layers.Embedding(seq, dim)(keras.ops.arange(seq)[None])


def bert_like(path: Path, seq: int = 32, dim: int = 64, heads: int = 4, layers: int = 2,
              vocab: int = 1000) -> dict:
    ids, x = _embedded_tokens(seq, dim, vocab)
    x = keras.layers.LayerNormalization(epsilon=1e-12)(x)
    for _ in range(layers):
        x = _transformer_block(x, dim, heads)
    pooled = keras.layers.Dense(dim, activation="tanh")(x[:, 0])
    model = keras.Model(ids, keras.layers.Dense(2)(pooled))
    _export_keras(model, path, [tf.TensorSpec([None, seq], tf.int32, "input_ids")])
    return {"input_ids": _rng().integers(0, vocab, (1, seq)).astype(np.int32)}


def gpt_like(path: Path, seq: int = 32, dim: int = 64, heads: int = 4, layers: int = 2,
             vocab: int = 1000) -> dict:
    """A decoder: causal self-attention, pre-LN blocks, logits over the vocabulary."""
    ids, x = _embedded_tokens(seq, dim, vocab)
    for _ in range(layers):
        h = keras.layers.LayerNormalization(epsilon=1e-5)(x)
        x = x + keras.layers.MultiHeadAttention(heads, dim // heads)(h, h, use_causal_mask=True)
        h = keras.layers.LayerNormalization(epsilon=1e-5)(x)
        x = x + keras.layers.Dense(dim)(keras.layers.Dense(dim * 4, activation="gelu")(h))
    x = keras.layers.LayerNormalization(epsilon=1e-5)(x)
    model = keras.Model(ids, keras.layers.Dense(vocab)(x))
    _export_keras(model, path, [tf.TensorSpec([None, seq], tf.int32, "input_ids")])
    return {"input_ids": _rng().integers(0, vocab, (1, seq)).astype(np.int32)}


def _text_rnn(layer: Callable[[], object], seq: int = 16, vocab: int = 1000) -> Callable:
    def build(path: Path) -> dict:
        keras.utils.set_random_seed(0)
        ids = keras.Input((seq,), dtype="int32")
        x = keras.layers.Embedding(vocab, 32)(ids)
        x = layer()(x)
        model = keras.Model(ids, keras.layers.Dense(4)(x))
        _export_keras(model, path, [tf.TensorSpec([None, seq], tf.int32, "tokens")])
        return {"tokens": _rng().integers(0, vocab, (1, seq)).astype(np.int32)}
    return build


def _stacked_lstm():
    return keras.Sequential([keras.layers.LSTM(32, return_sequences=True),
                             keras.layers.LSTM(32)])


def crnn(path: Path, height: int = 16, steps: int = 16) -> dict:
    """An OCR-style CRNN: convolutions, a bidirectional LSTM over the columns, a dense
    head per step."""
    keras.utils.set_random_seed(0)
    image = keras.Input((height, 4 * steps, 1))
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(image)
    x = keras.layers.MaxPool2D((2, 2))(x)
    x = keras.layers.Conv2D(32, 3, padding="same", activation="relu")(x)
    x = keras.layers.MaxPool2D((2, 2))(x)
    x = keras.layers.Permute((2, 1, 3))(x)
    x = keras.layers.Reshape((steps, height // 4 * 32))(x)
    x = keras.layers.Bidirectional(keras.layers.LSTM(32, return_sequences=True))(x)
    model = keras.Model(image, keras.layers.Dense(12, activation="softmax")(x))
    _export_keras(model, path, [tf.TensorSpec([None, height, 4 * steps, 1], tf.float32,
                                              "image")])
    return {"image": _rng().random((1, height, 4 * steps, 1), np.float32)}


def unet(path: Path, size: int = 64) -> dict:
    """A U-Net-style segmenter: down convs, Conv2DTranspose up, skip concats."""
    keras.utils.set_random_seed(0)
    image = keras.Input((size, size, 3))
    skips, x = [], image
    for filters in (8, 16, 32):
        x = keras.layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
        x = keras.layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
        skips.append(x)
        x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(64, 3, padding="same", activation="relu")(x)
    for filters, skip in zip((32, 16, 8), reversed(skips)):
        x = keras.layers.Conv2DTranspose(filters, 2, strides=2, padding="same")(x)
        x = keras.layers.Concatenate()([x, skip])
        x = keras.layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
    model = keras.Model(image, keras.layers.Conv2D(3, 1)(x))
    _export_keras(model, path, [tf.TensorSpec([None, size, size, 3], tf.float32, "image")])
    return {"image": _rng().random((1, size, size, 3), np.float32)}


def vit_like(path: Path, size: int = 32, patch: int = 8, dim: int = 64, heads: int = 4,
             layers: int = 2) -> dict:
    """Patches cut with reshape/transpose, a class token, position embeddings, encoder."""
    keras.utils.set_random_seed(0)
    grid = size // patch
    image = keras.Input((size, size, 3))
    x = keras.ops.reshape(image, (-1, grid, patch, grid, patch, 3))
    x = keras.ops.transpose(x, (0, 1, 3, 2, 4, 5))
    x = keras.ops.reshape(x, (-1, grid * grid, patch * patch * 3))
    x = keras.layers.Dense(dim)(x)
    tokens = grid * grid + 1
    cls = keras.ops.zeros_like(x[:, :1]) + keras.layers.Dense(dim)(
        keras.ops.ones_like(x[:, :1, :1]))
    x = keras.ops.concatenate([cls, x], axis=1)
    x = x + keras.layers.Embedding(tokens, dim)(keras.ops.arange(tokens)[None])
    for _ in range(layers):
        x = _transformer_block(x, dim, heads)
    model = keras.Model(image, keras.layers.Dense(10)(x[:, 0]))
    _export_keras(model, path, [tf.TensorSpec([None, size, size, 3], tf.float32, "image")])
    return {"image": _rng().random((1, size, size, 3), np.float32)}


def recommender(path: Path, tables: int = 4, rows: int = 1000, dim: int = 16,
                dense: int = 8) -> dict:
    """DLRM-like: embedding tables for categorical ids, a bottom MLP for dense features,
    dot-product interactions, a top MLP."""
    keras.utils.set_random_seed(0)
    ids = keras.Input((tables,), dtype="int32")
    feats = keras.Input((dense,))
    bottom = keras.layers.Dense(dim, activation="relu")(
        keras.layers.Dense(32, activation="relu")(feats))
    embedded = [keras.layers.Embedding(rows, dim)(ids[:, t]) for t in range(tables)]
    stacked = keras.ops.stack([bottom, *embedded], axis=1)
    interactions = keras.ops.matmul(stacked, keras.ops.transpose(stacked, (0, 2, 1)))
    flat = keras.ops.reshape(interactions, (-1, (tables + 1) ** 2))
    x = keras.layers.Concatenate()([bottom, flat])
    x = keras.layers.Dense(64, activation="relu")(x)
    model = keras.Model([ids, feats], keras.layers.Dense(1, activation="sigmoid")(x))
    _export_keras(model, path, [tf.TensorSpec([None, tables], tf.int32, "ids"),
                                tf.TensorSpec([None, dense], tf.float32, "dense")])
    rng = _rng()
    return {"ids": rng.integers(0, rows, (1, tables)).astype(np.int32),
            "dense": rng.random((1, dense), np.float32)}


class _Detector(tf.Module):
    """A small SSD-like head on a conv backbone, then CombinedNonMaxSuppression."""

    def __init__(self, size: int, anchors: int, classes: int):
        super().__init__()
        keras.utils.set_random_seed(0)
        image = keras.Input((size, size, 3))
        x = image
        for filters in (16, 32, 64):
            x = keras.layers.Conv2D(filters, 3, strides=2, padding="same", activation="relu")(x)
        cells = (size // 8) ** 2
        boxes = keras.layers.Reshape((cells * anchors, 1, 4))(
            keras.layers.Conv2D(anchors * 4, 1, activation="sigmoid")(x))
        scores = keras.layers.Reshape((cells * anchors, classes))(
            keras.layers.Conv2D(anchors * classes, 1, activation="sigmoid")(x))
        self.net = keras.Model(image, [boxes, scores])
        self.size = size

    @tf.function
    def __call__(self, image):
        boxes, scores = self.net(image)
        nms = tf.image.combined_non_max_suppression(
            boxes, scores, max_output_size_per_class=10, max_total_size=20,
            iou_threshold=0.5, score_threshold=0.1)
        return {"boxes": nms.nmsed_boxes, "scores": nms.nmsed_scores,
                "classes": nms.nmsed_classes, "detections": nms.valid_detections}


def detector(path: Path, size: int = 64) -> dict:
    module = _Detector(size, anchors=3, classes=5)
    fn = module.__call__.get_concrete_function(
        tf.TensorSpec([None, size, size, 3], tf.float32, "image"))
    tf.saved_model.save(module, str(path), signatures={"serving_default": fn})
    return {"image": _rng().random((1, size, size, 3), np.float32)}


class _CondModule(tf.Module):
    def __init__(self):
        super().__init__()
        rng = np.random.default_rng(1)
        self.w1 = tf.Variable(rng.standard_normal((16, 32)).astype(np.float32))
        self.w2 = tf.Variable(rng.standard_normal((16, 32)).astype(np.float32))
        self.out = tf.Variable(rng.standard_normal((32, 4)).astype(np.float32))

    @tf.function
    def __call__(self, x):
        h = tf.cond(tf.reduce_mean(x) > 0.0,
                    lambda: tf.nn.relu(tf.matmul(x, self.w1)),
                    lambda: tf.tanh(tf.matmul(x, self.w2)))
        return {"y": tf.matmul(h, self.out)}


def module_with_cond(path: Path) -> dict:
    module = _CondModule()
    fn = module.__call__.get_concrete_function(tf.TensorSpec([None, 16], tf.float32, "x"))
    tf.saved_model.save(module, str(path), signatures={"serving_default": fn})
    return {"x": _rng().standard_normal((1, 16)).astype(np.float32)}


def fp16_cnn(path: Path, size: int = 32) -> dict:
    """A CNN computing in float16 end to end, float16 in and out."""
    keras.utils.set_random_seed(0)
    image = keras.Input((size, size, 3), dtype="float16")
    x = image
    for filters in (16, 32):
        x = keras.layers.Conv2D(filters, 3, padding="same", activation="relu",
                                dtype="float16")(x)
        x = keras.layers.MaxPooling2D(dtype="float16")(x)
    x = keras.layers.GlobalAveragePooling2D(dtype="float16")(x)
    model = keras.Model(image, keras.layers.Dense(10, dtype="float16")(x))
    _export_keras(model, path, [tf.TensorSpec([None, size, size, 3], tf.float16, "image")])
    return {"image": _rng().random((1, size, size, 3)).astype(np.float16)}


VOCAB = ["red", "green", "blue", "black", "white"]


def tf1_example_table(path: Path, batch: int = 2) -> dict:
    """A TF1 Estimator-style serving graph: serialized tf.Example -> ParseExampleV2 ->
    vocabulary table (initialized by main_op) -> embedding -> dense tower."""
    graph = tf.Graph()
    rng = np.random.default_rng(2)
    with graph.as_default(), tf.compat.v1.Session(graph=graph) as sess:
        serialized = tf.compat.v1.placeholder(tf.string, [None], name="examples")
        parsed = tf.io.parse_example(serialized, {
            "color": tf.io.FixedLenFeature([1], tf.string, default_value="black"),
            "price": tf.io.FixedLenFeature([1], tf.float32, default_value=0.0),
            "size": tf.io.FixedLenFeature([3], tf.float32, default_value=[0.0, 0.0, 0.0])})
        table = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(VOCAB, list(range(len(VOCAB))),
                                                tf.string, tf.int64), default_value=-1)
        ids = table.lookup(tf.squeeze(parsed["color"], 1)) + 1
        embeddings = tf.compat.v1.get_variable(
            "embeddings", initializer=rng.standard_normal((len(VOCAB) + 1, 8)).astype(np.float32))
        x = tf.concat([tf.nn.embedding_lookup(embeddings, ids), parsed["price"],
                       parsed["size"]], axis=1)
        for k, width in enumerate((32, 16)):
            w = tf.compat.v1.get_variable(
                f"w{k}", initializer=rng.standard_normal((x.shape[1], width)).astype(
                    np.float32) * 0.3)
            x = tf.nn.relu(tf.matmul(x, w))
        w = tf.compat.v1.get_variable(
            "head", initializer=rng.standard_normal((16, 1)).astype(np.float32))
        prob = tf.sigmoid(tf.matmul(x, w), name="probability")
        sess.run(tf.compat.v1.global_variables_initializer())
        init = tf.compat.v1.tables_initializer()
        sess.run(init)
        builder = tf.compat.v1.saved_model.Builder(str(path))
        builder.add_meta_graph_and_variables(
            sess, ["serve"], main_op=init, signature_def_map={
                "serving_default": tf.compat.v1.saved_model.predict_signature_def(
                    {"examples": serialized}, {"probability": prob})})
        builder.save()
    examples = []
    for k in range(batch):
        example = tf.train.Example(features=tf.train.Features(feature={
            "color": tf.train.Feature(bytes_list=tf.train.BytesList(
                value=[VOCAB[k % len(VOCAB)].encode()])),
            "price": tf.train.Feature(float_list=tf.train.FloatList(value=[1.5 + k])),
            "size": tf.train.Feature(float_list=tf.train.FloatList(value=[1.0, 2.0, k + 0.5]))
        }))
        examples.append(example.SerializeToString())
    # Fixed-width bytes (no pickle in .npz) drop trailing NULs: no example may end in one.
    assert not any(e.endswith(b"\0") for e in examples)
    return {"examples": np.array(examples, dtype=bytes)}


def _zoo() -> list[ZooModel]:
    models = [ZooModel(app, "image classification", _keras_image(app, size),
                       fast=False)
              for app, size in IMAGE_MODELS]
    models += [
        ZooModel("BERT-like", "transformer encoder", bert_like),
        ZooModel("GPT-like", "transformer decoder", gpt_like),
        ZooModel("ViT-like", "vision transformer", vit_like),
        ZooModel("LSTM text", "RNN", _text_rnn(lambda: keras.layers.LSTM(32)), fast=True),
        ZooModel("GRU text", "RNN", _text_rnn(lambda: keras.layers.GRU(32))),
        ZooModel("BiLSTM text", "RNN",
                 _text_rnn(lambda: keras.layers.Bidirectional(keras.layers.LSTM(32)))),
        ZooModel("stacked LSTM", "RNN", _text_rnn(_stacked_lstm)),
        ZooModel("CRNN", "OCR (conv + RNN)", crnn),
        ZooModel("U-Net", "segmentation", unet),
        ZooModel("recommender", "recommender", recommender),
        ZooModel("detector+NMS", "detection", detector, fast=True),
        ZooModel("TF1 Example+table", "TF1 serving graph", tf1_example_table, batch_size=2,
                 fast=True),
        ZooModel("tf.Module cond", "control flow", module_with_cond, fast=True),
        ZooModel("fp16 CNN", "fp16", fp16_cnn),
    ]
    return models


ZOO: dict[str, ZooModel] = {m.name: m for m in _zoo()}
