"""What each zoo model must reach, per backend: pinned from measured runs.

ratio: the OnNeuronRatio may not fall below it; segments: may not rise above it;
left_in_tf: exactly these op types stay in TensorFlow, each with its reason code;
dynamic_batch: compiled at the model's batch size, it still runs at any other (a model
fixed to its batch cannot be served with batching).
"""

from __future__ import annotations

from dataclasses import dataclass, field

# CNN, Transformer and RNN families compile whole on the default backend.
MUST_BE_WHOLE = frozenset({"image classification", "transformer encoder",
                           "transformer decoder", "vision transformer", "RNN"})


@dataclass(frozen=True)
class Expected:
    ratio: float
    segments: int
    left_in_tf: dict[str, str] = field(default_factory=dict)
    tolerance: float = 1e-3  # relative to the output's magnitude
    dynamic_batch: bool = True
    known_issue: str | None = None  # a defect the zoo found and that is not fixed yet


WHOLE = Expected(ratio=1.0, segments=1)

# XLA where it is meaningful: loops (XLA's strength on CPU), attention, a plain CNN, a
# conditional and a TF1 serving graph. Models full of depthwise convolutions are left out:
# XLA:CPU runs those ~65x slower than TF, so the XLA backend keeps them in TF by design.
_XLA_TOO = {"ResNet50", "BERT-like", "LSTM text", "GRU text", "BiLSTM text", "stacked LSTM",
            "CRNN",
            "U-Net", "TF1 Example+table", "tf.Module cond"}

# auto, the default on CPU: loops go to XLA (placed by op kind: the zoo tests pass
# --no-profile, so placement does not follow the machine's load); an RNN with no
# convolution goes there whole, a CRNN splits (convolutions on OpenVINO).
_AUTO = ["LSTM text", "GRU text", "BiLSTM text", "stacked LSTM", "CRNN"]

_ALL = ["VGG16", "ResNet50", "ResNet50V2", "Xception", "InceptionV3", "InceptionResNetV2",
        "MobileNet", "MobileNetV2", "MobileNetV3Small", "DenseNet121", "NASNetMobile",
        "EfficientNetB0", "EfficientNetV2B0", "ConvNeXtTiny", "BERT-like", "GPT-like",
        "ViT-like", "LSTM text", "GRU text", "BiLSTM text", "stacked LSTM", "CRNN", "U-Net",
        "recommender", "detector+NMS", "TF1 Example+table", "tf.Module cond", "fp16 CNN"]

_TABLE_PLUMBING = {"HashTableV2": "DTYPE", "LookupTableFindV2": "STRING",
                   "LookupTableImportV2": "STRING", "ParseExampleV2": "STRING",
                   "Reshape": "STRING", "Squeeze": "STRING"}

# Fixed to their compiled batch (dynamic_batch False), each for a known reason:
# - OpenVINO takes a Keras RNN's loop whole with its zero state folded at the compiled
#   batch, and its frontend refuses loops whose state shapes are computed instead; XLA
#   (and so auto) computes them from the batch (loops.batch_sized_loop_states).
# - The CRNN's loops run time-major: the batch is on axis 1 there, which the batch
#   analysis does not follow.
_FIXED_BATCH = {("LSTM text", "openvino"), ("GRU text", "openvino"),
                ("BiLSTM text", "openvino"), ("stacked LSTM", "openvino"),
                ("CRNN", "openvino"), ("CRNN", "xla")}
WHOLE_FIXED_BATCH = Expected(ratio=1.0, segments=1, dynamic_batch=False)

EXPECTED: dict[tuple[str, str], Expected] = {
    **{(name, "openvino"): WHOLE for name in _ALL},
    **{(name, "xla"): WHOLE for name in _ALL if name in _XLA_TOO},
    **{(name, "auto"): WHOLE for name in _AUTO},
    **dict.fromkeys(_FIXED_BATCH, WHOLE_FIXED_BATCH),
    ("CRNN", "auto"): Expected(ratio=1.0, segments=3, dynamic_batch=False),
    # NMS has no OpenVINO frontend conversion; the IdentityN after it is alone.
    ("detector+NMS", "openvino"): Expected(
        ratio=0.857, segments=1, left_in_tf={"CombinedNonMaxSuppression": "UNSUPPORTED_OP",
                                             "IdentityN": "SMALL_SEGMENT"}),
    # The tf.Example parsing and the vocabulary table work on strings; the whole dense
    # tower after the lookup compiles.
    ("TF1 Example+table", "openvino"): Expected(ratio=0.6, segments=1,
                                                left_in_tf=_TABLE_PLUMBING),
    ("TF1 Example+table", "xla"): Expected(ratio=0.6, segments=1, left_in_tf=_TABLE_PLUMBING),
}
