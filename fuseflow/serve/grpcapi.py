"""TF Serving's gRPC `PredictionService.Predict`, mapped onto numpy: PredictRequest in,
PredictResponse out, with the protos of `tensorflow-serving-api`.

The model lookup, signatures and input checks are the REST path's (versions.py, rest.py);
this module only converts: TensorProto to numpy with `tf.make_ndarray`, back with
`tf.make_tensor_proto`, and errors to the gRPC status codes TF Serving uses (their names
are RestError's codes: NOT_FOUND, INVALID_ARGUMENT, ...).

Ray Serve's gRPC proxy imports the servicer function below and calls the ingress
deployment's method of the RPC's name (`Predict`) with the parsed request.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fuseflow.serve import rest
from fuseflow.serve.rest import RestError, TensorSpec

SERVICER = ("tensorflow_serving.apis.prediction_service_pb2_grpc."
            "add_PredictionServiceServicer_to_server")
DEFAULT_PORT = 8500  # TF Serving's --port (gRPC)
# The protos, as the Makefile installs them: with --no-deps, since the package requires
# `tensorflow`, which pip would add beside fuseflow's `tensorflow-cpu`.
PROTOS = "tensorflow-serving-api==2.21.0"
INSTALL_HINT = f"pip install --no-deps {PROTOS}"
# PredictionService's other RPCs: registered with the service, answered UNIMPLEMENTED
OTHER_METHODS = ("Classify", "Regress", "MultiInference", "GetModelMetadata")


def available() -> bool:
    """Whether the tensorflow-serving-api protos are installed."""
    import importlib.util

    try:
        return importlib.util.find_spec("tensorflow_serving.apis") is not None
    except ModuleNotFoundError:
        return False


@dataclass(frozen=True)
class Spec:
    """A request's ModelSpec: name, version (None: latest), signature key."""

    name: str
    version: int | None
    signature_name: str


def model_spec(request) -> Spec:
    """The request's ModelSpec; a version label is refused as TF Serving refuses a label
    it has no mapping for (fuseflow serve assigns no labels)."""
    spec = request.model_spec
    if not spec.name:
        raise RestError("INVALID_ARGUMENT", "Missing ModelSpec name: set model_spec.name")
    choice = spec.WhichOneof("version_choice")
    if choice == "version_label":
        raise RestError("INVALID_ARGUMENT", "Unrecognized servable version label: "
                        f"{spec.version_label} (fuseflow serve has no version labels: set "
                        "model_spec.version, or leave it unset for the latest)")
    version = spec.version.value if choice == "version" else None
    return Spec(spec.name, version, spec.signature_name or "serving_default")


def not_found(name: str, version: int | None) -> RestError:
    what = f"Specific({name}, {version})" if version is not None else f"Latest({name})"
    return RestError("NOT_FOUND", f"Servable not found for request: {what}")


def parse(raw: bytes):
    from tensorflow_serving.apis import predict_pb2

    request = predict_pb2.PredictRequest()
    try:
        request.ParseFromString(raw)
    except Exception as e:  # protobuf's DecodeError
        raise RestError("INVALID_ARGUMENT", f"Malformed PredictRequest: {e}") from e
    return request


def feeds(request, inputs: dict[str, TensorSpec]) -> dict[str, np.ndarray]:
    """The request's TensorProtos as arrays, checked against the signature's inputs (names,
    dtypes, shapes) with the REST path's checks."""
    from fuseflow.tf_compat import tf

    rest.check_names(set(request.inputs), inputs)
    arrays = {}
    for key, proto in request.inputs.items():
        spec = inputs[key]
        try:
            dtype = np.dtype(tf.dtypes.as_dtype(proto.dtype).as_numpy_dtype)  # string: object
            if dtype != spec.dtype:
                want = "string" if spec.dtype == object else spec.dtype.name
                raise RestError("INVALID_ARGUMENT", f"Input {spec.describe()} expects {want} "
                                f"values, got {_enum_name(proto.dtype)}")
            array = tf.make_ndarray(proto)
        except (TypeError, ValueError) as e:
            raise RestError("INVALID_ARGUMENT", f"Input {key!r}: not a valid TensorProto "
                            f"({e})") from e
        rest.check_shape(spec, array, batched=False)
        arrays[key] = array
    return arrays


def _enum_name(value: int) -> str:
    from tensorflow.core.framework import types_pb2

    return types_pb2.DataType.Name(value)


def batchable(arrays: dict[str, np.ndarray], inputs: dict[str, TensorSpec]) -> bool:
    """Whether requests may be concatenated along dim 0: every input is declared with an
    unknown first dimension (a batch) and all were sent with the same one."""
    sizes = {a.shape[0] if a.ndim else None for a in arrays.values()}
    return len(sizes) == 1 and None not in sizes and all(
        s.shape is not None and len(s.shape) >= 1 and s.shape[0] is None
        for s in inputs.values())


def output_keys(request, outputs: dict[str, TensorSpec]) -> list[str]:
    """The outputs to answer with: request.output_filter, or all of them."""
    wanted = list(request.output_filter)
    if not wanted:
        return list(outputs)
    for key in wanted:
        if key not in outputs:
            raise RestError("INVALID_ARGUMENT", f"output tensor alias not found in signature: "
                            f"{key}. Outputs expected to be in the set {{{','.join(outputs)}}}.")
    if len(set(wanted)) != len(wanted):
        raise RestError("INVALID_ARGUMENT", f"duplicate output tensor alias in output_filter: "
                        f"{wanted}")
    return wanted


def response(spec: Spec, version: int, signature_key: str,
             outputs: dict[str, np.ndarray], keys: list[str]) -> bytes:
    """A serialized PredictResponse: the outputs asked for, and the model_spec served."""
    from tensorflow_serving.apis import predict_pb2

    from fuseflow.tf_compat import tf

    answer = predict_pb2.PredictResponse()
    answer.model_spec.name = spec.name
    answer.model_spec.version.value = version
    answer.model_spec.signature_name = signature_key
    for key in keys:
        answer.outputs[key].CopyFrom(tf.make_tensor_proto(outputs[key]))
    return answer.SerializeToString()


@dataclass(frozen=True)
class Serialized:
    """A response message already serialized by the model's replica. Ray Serve sends back
    what the ingress method returns as `result.SerializeToString()`, so the ingress need
    not parse the model's answer only to serialize it again."""

    raw: bytes

    def SerializeToString(self) -> bytes:  # noqa: N802 (protobuf's name)
        return self.raw


def answer(grpc_context, code: str, message: str, raw: bytes) -> Serialized:
    """What an ingress returns to Ray's gRPC proxy: the PredictResponse, or an empty one
    with the status code and details set on the call's context (Ray Serve's way of
    answering a gRPC error without logging an exception)."""
    import grpc

    if code == "OK":
        return Serialized(raw)
    if grpc_context is not None:
        grpc_context.set_code(getattr(grpc.StatusCode, code, grpc.StatusCode.INTERNAL))
        grpc_context.set_details(message)
    return Serialized(b"")


def unimplemented(grpc_context, method: str) -> Serialized:
    """Classify, Regress, MultiInference, GetModelMetadata over gRPC: not served (yet)."""
    return answer(grpc_context, "UNIMPLEMENTED", "fuseflow serve answers PredictionService."
                  f"Predict over gRPC; use the REST API for {method}", b"")
