"""TF Serving's REST API, mapped onto numpy: request JSON in, response JSON out.

Pure data handling (no Ray, no TF session): the row (`instances`) and columnar (`inputs`)
predict forms, `{"b64": ...}` binary values, tf.Example bodies of classify/regress, and
errors as TF Serving reports them: `{"error": "..."}` with the HTTP status its
`ToHTTPStatusCode` gives the status code (INVALID_ARGUMENT 400, NOT_FOUND 404, ...).
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass

import numpy as np

# TF Serving's mapping of status codes to HTTP (model_servers/http_server.cc).
HTTP_STATUS = {
    "INVALID_ARGUMENT": 400, "FAILED_PRECONDITION": 400, "OUT_OF_RANGE": 400,
    "NOT_FOUND": 404, "RESOURCE_EXHAUSTED": 429, "UNIMPLEMENTED": 501, "INTERNAL": 500,
    "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504,
}

PREDICT_METHOD = "tensorflow/serving/predict"
CLASSIFY_METHOD = "tensorflow/serving/classify"
REGRESS_METHOD = "tensorflow/serving/regress"

# /v1/models/<name>[/versions/<v>][/metadata | :predict | :classify | :regress]
_PATH = re.compile(r"/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>[^/:]+))?"
                   r"(?:(?P<metadata>/metadata)|:(?P<verb>predict|classify|regress))?/?")


class RestError(Exception):
    """A request TF Serving would refuse: its status code name and message."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message

    @property
    def http_status(self) -> int:
        return HTTP_STATUS[self.code]

    def body(self) -> dict:
        return {"error": self.message}


def parse_body(raw: bytes) -> dict:
    """A request body as the JSON object TF Serving requires."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise RestError("INVALID_ARGUMENT", f"JSON Parse error: {e}") from e
    if not isinstance(body, dict):
        raise RestError("INVALID_ARGUMENT", "JSON Value: the request body must be a JSON "
                        "object")
    return body


def dumps(payload) -> bytes:
    """A response body: compact UTF-8 JSON (NaN and Infinity as TF Serving writes them)."""
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Route:
    model: str
    version: int | None
    verb: str  # "status", "metadata", "predict", "classify" or "regress"


def parse_path(path: str, method: str) -> Route:
    match = _PATH.fullmatch(path)
    if match is None:
        raise RestError("INVALID_ARGUMENT", f"Malformed request: {method} {path}")
    version = match["version"]
    if version is not None and not version.isdigit():
        raise RestError("INVALID_ARGUMENT",
                        f"Failed to convert version: {version} to numeric.")
    verb = match["verb"] or ("metadata" if match["metadata"] else "status")
    want = "POST" if match["verb"] else "GET"
    if method != want:
        raise RestError("INVALID_ARGUMENT", f"Malformed request: {method} {path}")
    return Route(match["name"], int(version) if version is not None else None, verb)


@dataclass(frozen=True)
class TensorSpec:
    """One signature input or output as the SignatureDef declares it."""

    key: str
    dtype: np.dtype  # object for DT_STRING
    shape: tuple[int | None, ...] | None  # None: unknown rank

    def describe(self) -> str:
        dims = "?" if self.shape is None else ",".join("?" if d is None else str(d)
                                                       for d in self.shape)
        return f"{self.key} ({'string' if self.dtype == object else self.dtype.name}[{dims}])"


def _decode(value):
    """{"b64": "..."} (at any depth) -> bytes; everything else unchanged."""
    if isinstance(value, dict):
        if set(value) == {"b64"} and isinstance(value["b64"], str):
            try:
                return base64.b64decode(value["b64"], validate=True)
            except ValueError as e:
                raise RestError("INVALID_ARGUMENT", f"Unable to base64 decode: {e}") from e
        raise RestError("INVALID_ARGUMENT", f"Unexpected JSON object {sorted(value)}: only "
                        "{\"b64\": ...} may stand for a value")
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def to_array(spec: TensorSpec, value, batched: bool) -> np.ndarray:
    """A JSON value as spec's dtype and shape, or the INVALID_ARGUMENT TF Serving gives."""
    value = _decode(value)
    try:
        raw = np.asarray(value)
    except ValueError as e:  # ragged lists
        raise RestError("INVALID_ARGUMENT", f"Input {spec.key!r}: the lists are not "
                        f"rectangular (all rows must have the same shape): {e}") from e
    kind = raw.dtype.kind
    if spec.dtype == object:
        if raw.size and kind not in "USO":
            raise RestError("INVALID_ARGUMENT", f"Input {spec.key!r} expects strings, got "
                            f"{raw.dtype.name} values")
        array = np.vectorize(lambda s: s if isinstance(s, bytes) else str(s).encode(),
                             otypes=[object])(raw) if raw.size else raw.astype(object)
    else:
        allowed = {"b": "b", "i": "biu", "u": "biu", "f": "biuf", "c": "biufc"}
        if raw.size and kind not in allowed.get(spec.dtype.kind, ""):
            raise RestError("INVALID_ARGUMENT", f"Input {spec.key!r} expects "
                            f"{spec.dtype.name} values, got {raw.dtype.name} ({_sample(raw)})")
        array = raw.astype(spec.dtype)
    check_shape(spec, array, batched)
    return array


def _sample(raw: np.ndarray) -> str:
    return repr(raw.reshape(-1)[0].item() if raw.size else None)


def check_shape(spec: TensorSpec, array: np.ndarray, batched: bool) -> None:
    if spec.shape is None:
        return
    ok = len(spec.shape) == array.ndim and all(
        d is None or d == n for d, n in zip(spec.shape, array.shape))
    if not ok:
        got = ",".join(str(n) for n in array.shape)
        how = " (the batch of all instances)" if batched else ""
        raise RestError("INVALID_ARGUMENT", f"Input {spec.describe()} got shape [{got}]"
                        f"{how}: send values of the signature's shape")


def predict_inputs(body: dict, inputs: dict[str, TensorSpec]) -> tuple[dict[str, np.ndarray],
                                                                        bool]:
    """The arrays of a predict body, and whether it was the row form."""
    has_rows, has_columns = "instances" in body, "inputs" in body
    if has_rows == has_columns:
        raise RestError("INVALID_ARGUMENT", "Missing 'inputs' or 'instances' key" if not has_rows
                        else "Not both 'inputs' and 'instances' may be set in the request")
    if has_rows:
        rows = body["instances"]
        if not isinstance(rows, list) or not rows:
            raise RestError("INVALID_ARGUMENT", "'instances' must be a non-empty JSON list")
        named = all(isinstance(r, dict) and not set(r) <= {"b64"} for r in rows)
        if named:
            columns = {}
            for r in rows:
                check_names(set(r), inputs)
            for key in inputs:
                columns[key] = [r[key] for r in rows]
        elif len(inputs) == 1:
            columns = {next(iter(inputs)): rows}
        else:
            raise RestError("INVALID_ARGUMENT", "The signature has inputs "
                            f"{sorted(inputs)}: each instance must be a JSON object "
                            "naming every one of them")
        return {k: to_array(inputs[k], v, batched=True) for k, v in columns.items()}, True
    columns = body["inputs"]
    if isinstance(columns, dict) and not set(columns) <= {"b64"}:
        check_names(set(columns), inputs)
    elif len(inputs) == 1:
        columns = {next(iter(inputs)): columns}
    else:
        raise RestError("INVALID_ARGUMENT", f"The signature has inputs {sorted(inputs)}: "
                        "'inputs' must be a JSON object naming every one of them")
    return {k: to_array(inputs[k], v, batched=False) for k, v in columns.items()}, False


def check_names(given: set[str], inputs: dict[str, TensorSpec]) -> None:
    unknown, missing = sorted(given - set(inputs)), sorted(set(inputs) - given)
    if unknown or missing:
        what = "; ".join(x for x in (f"unknown input(s) {unknown}" if unknown else "",
                                     f"missing input(s) {missing}" if missing else "") if x)
        raise RestError("INVALID_ARGUMENT", f"{what}: the signature's inputs are "
                        + ", ".join(s.describe() for s in inputs.values()))


def to_json(value: np.ndarray):
    """A TF output as JSON: numbers as numbers, strings as text or {"b64": ...}."""
    if value.dtype == object or value.dtype.kind == "S":
        def text(b):
            try:
                return b.decode("utf-8")
            except UnicodeDecodeError:
                return {"b64": base64.b64encode(b).decode()}
        return np.vectorize(text, otypes=[object])(value).tolist() if value.size else []
    return value.tolist()


def predict_response(outputs: dict[str, np.ndarray], row_form: bool) -> dict:
    if not row_form:
        if len(outputs) == 1:
            return {"outputs": to_json(next(iter(outputs.values())))}
        return {"outputs": {k: to_json(v) for k, v in outputs.items()}}
    sizes = {k: (v.shape[0] if v.ndim else None) for k, v in outputs.items()}
    if len(set(sizes.values())) != 1 or None in sizes.values():
        raise RestError("INVALID_ARGUMENT", "Batch size of the outputs differs, or an output "
                        f"is a scalar ({sizes}): use the columnar 'inputs' form for this model")
    if len(outputs) == 1:
        return {"predictions": to_json(next(iter(outputs.values())))}
    columns = {k: to_json(v) for k, v in outputs.items()}
    rows = next(iter(sizes.values()))
    return {"predictions": [{k: columns[k][i] for k in columns} for i in range(rows)]}


def _feature(name: str, value):
    from tensorflow.core.example import feature_pb2

    values = value if isinstance(value, list) else [value]
    values = [_decode(v) for v in values]
    if all(isinstance(v, bool) or isinstance(v, int) for v in values):
        return feature_pb2.Feature(int64_list=feature_pb2.Int64List(value=values))
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return feature_pb2.Feature(float_list=feature_pb2.FloatList(value=values))
    if all(isinstance(v, (str, bytes)) for v in values):
        return feature_pb2.Feature(bytes_list=feature_pb2.BytesList(
            value=[v.encode() if isinstance(v, str) else v for v in values]))
    raise RestError("INVALID_ARGUMENT", f"Feature {name!r}: values must be all numbers or all "
                    f"strings, got {value!r}")


def examples(body: dict) -> np.ndarray:
    """A classify/regress body (`examples`, optional `context`) as serialized tf.Examples."""
    from tensorflow.core.example import example_pb2

    rows, context = body.get("examples"), body.get("context", {})
    if not isinstance(rows, list) or not rows:
        raise RestError("INVALID_ARGUMENT", "'examples' must be a non-empty JSON list")
    if not isinstance(context, dict) or not all(isinstance(r, dict) for r in rows):
        raise RestError("INVALID_ARGUMENT", "'examples' items and 'context' must be JSON objects")
    serialized = []
    for row in rows:
        example = example_pb2.Example()
        for name, value in {**context, **row}.items():
            example.features.feature[name].CopyFrom(_feature(name, value))
        serialized.append(example.SerializeToString())
    return np.array(serialized, dtype=object)


def classify_response(outputs: dict[str, np.ndarray]) -> dict:
    classes, scores = outputs.get("classes"), outputs.get("scores")
    if scores is None and classes is None:
        raise RestError("INVALID_ARGUMENT", "The classify signature has neither 'classes' nor "
                        "'scores' outputs")
    n, k = (scores if scores is not None else classes).shape[:2]
    result = []
    for i in range(n):
        labels = [to_json(np.asarray(classes[i][j:j + 1], dtype=object))[0]
                  if classes is not None else "" for j in range(k)]
        result.append([[labels[j], float(scores[i][j]) if scores is not None else 0.0]
                       for j in range(k)])
    return {"result": result}


def regress_response(outputs: dict[str, np.ndarray]) -> dict:
    if "outputs" not in outputs:
        raise RestError("INVALID_ARGUMENT", "The regress signature has no 'outputs' output")
    return {"result": np.asarray(outputs["outputs"]).reshape(-1).astype(float).tolist()}
