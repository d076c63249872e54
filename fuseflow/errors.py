"""The one exception hierarchy of fuseflow.

Every error a user can cause is raised as a `FuseflowError` subclass whose
message names the offending path/tensor/op and says what to do about it.
Several also derive from the builtin the reference raised (ValueError,
FileExistsError, ...) so code written for tensorflow-neuron keeps catching them.
"""


class FuseflowError(Exception):
    """Base class of every error fuseflow raises on purpose."""


class ModelLoadError(FuseflowError, ValueError):
    """The input SavedModel is missing, unreadable or malformed."""


class TagError(FuseflowError, ValueError):
    """No MetaGraphDef matches the requested tag set."""


class SignatureError(FuseflowError, ValueError):
    """The requested signature does not exist or cannot be used."""


class ShapeError(FuseflowError, ValueError):
    """Input shapes could not be determined, or feeds do not match the inputs."""


class OptionError(FuseflowError, ValueError):
    """A compile() argument has a bad value or type."""


class CompilerArgsError(OptionError):
    """compiler_args (or FUSEFLOW_CC_FLAGS) holds an unknown or malformed flag."""


class OutputDirError(FuseflowError, FileExistsError):
    """new_model_dir (or compiler_workdir) cannot be written as asked."""


class GraphError(FuseflowError, ValueError):
    """The model's graph is malformed (cycle, dangling input, duplicate name, unknown op)."""


class SegmentCompileError(FuseflowError, ValueError):
    """One or more segments failed to compile while --must-compile was set."""


class NativeOpError(FuseflowError, RuntimeError):
    """The native FuseflowOp library could not be built or loaded."""


class ExportError(FuseflowError, RuntimeError):
    """The compiled SavedModel could not be written."""


def reason(e: BaseException) -> str:
    """The line of a (TensorFlow) error that says what went wrong, and at which node.

    TF wraps it in headers ("Graph execution error:"), node tags and a
    Python stack trace; quoting the first line often quotes only a header.
    """
    text = type(e).__name__
    for line in str(e).splitlines():
        line = line.strip()
        if line.startswith("Original stack trace"):
            break
        if line and not line.endswith(":") and not line.startswith(("Node:", "[[", "File \"")):
            text = line.rstrip(".")
            break
    node = getattr(getattr(e, "node_def", None), "name", "")
    return f"{text} (at node {node!r})" if node and node not in text else text
