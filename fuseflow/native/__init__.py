"""The native FuseflowOp: a TF custom op that runs an OpenVINO-compiled segment.

`load_op_library()` builds the library on first use (see `build.py`) and loads it into
TensorFlow once per process; the returned module has the generated op wrappers
`fuseflow_op(...)` and `fuseflow_op_stats()`.
"""

from __future__ import annotations

import threading
from pathlib import Path
from types import ModuleType

from fuseflow.errors import NativeOpError

_lock = threading.Lock()
_module: ModuleType | None = None


def library_path() -> Path:
    """Where the op library is (or will be) built."""
    from fuseflow.native import build

    return build.LIBRARY


def load_op_library() -> ModuleType:
    """Build the library if needed and load it; the same module every call."""
    global _module
    with _lock:
        if _module is None:
            from fuseflow.native import build
            from fuseflow.tf_compat import tf

            try:
                path = build.build()
            except build.BuildError as e:
                raise NativeOpError(f"cannot build the FuseflowOp library: {e}") from e
            import openvino  # noqa: F401  (loads libopenvino.so.* whatever the rpath says)

            try:
                _module = tf.load_op_library(str(path))
            except Exception as e:  # TF raises NotFoundError for unresolved symbols
                raise NativeOpError(f"cannot load the FuseflowOp library {path}: {e}") from e
        return _module
