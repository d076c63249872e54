"""Why an op stayed in TensorFlow: the fixed set of reasons the report uses."""

from enum import Enum


class Reason(str, Enum):
    UNSUPPORTED_OP = "not supported by the backend"
    DTYPE = "dtype not supported by the backend"
    RUNTIME_OPERAND = "needs a constant operand that is computed at run time"
    UNKNOWN_SHAPE = "unknown shape"
    STRING = "operates on strings"
    CONTROL_INPUT = "has control inputs"
    CONTROL_FLOW = "inside a TF1 loop/cond the backend cannot take whole"
    INTERNAL_PORT = "would pass a TensorList (variant) between a segment and TF"
    BODY_UNSUPPORTED = "its loop/conditional body holds ops the backend does not take"
    NO_FUSE_OPS = "in no_fuse_ops"
    UPSTREAM_OF_INPUT = "upstream of a signature input"
    SMALL_SEGMENT = "segment smaller than minimum_segment_size"
    SLOW_ON_BACKEND = "slower on this backend than in TensorFlow"
    SLOWER_THAN_TF = "slower than TensorFlow"
    COMPILE_FAILED = "compile failed"
    STRUCTURAL = "graph plumbing (placeholder, constant, no-op)"
