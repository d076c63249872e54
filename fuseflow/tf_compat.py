"""Import TensorFlow once, quietly, for every fuseflow module."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # keep warnings: the fused op reports fallbacks

import tensorflow as tf  # noqa: E402

__all__ = ["tf"]
