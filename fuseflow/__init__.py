"""fuseflow: ahead-of-time compiler for TensorFlow SavedModels.

`import fuseflow as tfn; tfn.saved_model.compile(...)` is the tensorflow-neuron
1.x API; `tfn.trace`, `tfn.analyze_model` and `tfn.auto_multicore` the 2.x one.
Importing fuseflow also registers the native FuseflowOp, so models compiled
with the OpenVINO backend load (as `import tensorflow.neuron` did), and turns on
TF's persistent XLA cache, so XLA segments load their executables (xla_cache.py).
"""

import logging
import os

from fuseflow import xla_cache

xla_cache.configure_process()  # before TF reads TF_XLA_FLAGS (at its first XLA use)

__version__ = "0.1.0"

# Set in a compiler process's environment (compile.py): it imports TensorFlow only when
# a job needs it. An OpenVINO compile does not, and importing TF took 3 s of the two
# cores it shares with the compile that started it.
COMPILER_PROCESS = "FUSEFLOW_COMPILER_PROCESS"
if os.environ.get(COMPILER_PROCESS) != "1":
    # First: TensorFlow imported with its C++ start-up lines hidden (tf_compat.py), before
    # a module imports any part of it directly.
    from fuseflow import tf_compat  # noqa: E402, F401

    # isort: split
    from fuseflow import errors, graph_util, native, saved_model  # noqa: E402
    from fuseflow.multicore import auto_multicore  # noqa: E402
    from fuseflow.runtime import runtime_stats  # noqa: E402
    from fuseflow.trace import TracedModel, analyze_model, trace  # noqa: E402

    __all__ = ["errors", "graph_util", "native", "runtime_stats", "saved_model", "trace",
               "analyze_model", "auto_multicore", "TracedModel", "__version__"]

    xla_cache.hook_loaders()
    _log = logging.getLogger("fuseflow")
    _log.addHandler(logging.NullHandler())
    try:
        native.load_op_library()
    except errors.NativeOpError as e:  # XLA-compiled models still work without it
        _log.warning("%s; models compiled with the OpenVINO backend will not load", e)
