"""fuseflow: ahead-of-time compiler for TensorFlow SavedModels.

`import fuseflow as tfn; tfn.saved_model.compile(...)` is the tensorflow-neuron
1.x API; `tfn.trace`, `tfn.analyze_model` and `tfn.auto_multicore` the 2.x one.
Importing fuseflow also registers the native FuseflowOp, so models compiled
with the OpenVINO backend load (as `import tensorflow.neuron` did).
"""

import logging

from fuseflow import errors, graph_util, native, saved_model
from fuseflow.multicore import auto_multicore
from fuseflow.runtime import runtime_stats
from fuseflow.trace import TracedModel, analyze_model, trace

__version__ = "0.1.0"
__all__ = ["errors", "graph_util", "native", "runtime_stats", "saved_model", "trace",
           "analyze_model", "auto_multicore", "TracedModel", "__version__"]

_log = logging.getLogger("fuseflow")
_log.addHandler(logging.NullHandler())
try:
    native.load_op_library()
except errors.NativeOpError as e:  # XLA-compiled models still work without it
    _log.warning("%s; models compiled with the OpenVINO backend will not load", e)
