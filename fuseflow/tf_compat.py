"""Import TensorFlow once, quietly, for every fuseflow module."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

__all__ = ["tf"]
