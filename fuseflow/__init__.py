"""fuseflow: ahead-of-time compiler for TensorFlow SavedModels.

`import fuseflow as tfn; tfn.saved_model.compile(...)` is the tensorflow-neuron
1.x API. Importing fuseflow also registers the native FuseflowOp, so models
compiled with the OpenVINO backend load (as `import tensorflow.neuron` did).
"""

import logging

from fuseflow import errors, saved_model


__version__ = "0.1.0"
__all__ = ["errors", "saved_model", "__version__"]

logging.getLogger("fuseflow").addHandler(logging.NullHandler())

