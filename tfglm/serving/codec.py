"""TF Serving's JSON ⇄ tensors, for the REST front and the client alike (no web server imported): request values as
numpy arrays of a signature input's dtype, outputs as TF Serving writes them, tf.Example features from JSON, and
the row (`instances`) and columnar (`inputs`) formats of a predict request and its response."""

import base64
import binascii
import json

import numpy as np
import tensorflow as tf

from tfglm.serving.checks import RequestError


def json_object(body):
    """A request body (bytes) parsed as a JSON object."""
    try:
        request = json.loads(body)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise RequestError(f"JSON Parse error: {e}") from None
    if not isinstance(request, dict):
        raise RequestError("the request body must be a JSON object")
    return request


def is_row_format(request):
    """Whether a predict request is in row format (`instances`) rather than columnar (`inputs`)."""
    if ("instances" in request) == ("inputs" in request):
        raise RequestError('Missing \'inputs\' or \'instances\' key (give one: {"instances": [...]} or '
                           '{"inputs": ...})')
    return "instances" in request


def predict_columns(request, signature):
    """{input name: JSON value} of a predict request in either format."""
    if is_row_format(request):
        return _rows_to_columns(request["instances"], signature)
    return _columns(request["inputs"], signature)


def predict_response(outputs, row):
    """The JSON response of a predict request for its outputs (name -> numpy array), in the request's format."""
    outputs = {k: to_json(k, v) for k, v in outputs.items()}
    if not row:
        return {"outputs": next(iter(outputs.values())) if len(outputs) == 1 else outputs}
    sizes = {len(v) for v in outputs.values()}
    if len(sizes) != 1:
        raise RequestError("row format (instances) needs outputs of one batch size; use columnar (inputs)")
    if len(outputs) == 1:
        return {"predictions": next(iter(outputs.values()))}
    return {"predictions": [{k: v[i] for k, v in outputs.items()} for i in range(sizes.pop())]}


def examples(request):
    """Serialized tf.Examples of a classify or regress request (`examples`, each merged over `context`)."""
    rows, context = request.get("examples"), request.get("context", {})
    if not isinstance(rows, list) or not isinstance(context, dict):
        raise RequestError("Missing 'examples' key (a list of {feature: value} objects; 'context', if given, one "
                           "such object)")
    for i, features in enumerate(rows):
        if not isinstance(features, dict):
            raise RequestError(f"examples[{i}]: expected an object of features")
    return [to_example({**context, **features}, f"examples[{i}]").SerializeToString()
            for i, features in enumerate(rows)]


def to_example(features, where):
    """A tf.Example from JSON features: strings (or {"b64": ...}) as bytes, integers as int64, numbers as float."""
    example = tf.train.Example()
    for key, value in features.items():
        values, feature = value if isinstance(value, list) else [value], example.features.feature[key]
        try:
            if all(isinstance(v, (str, dict)) for v in values):
                feature.bytes_list.value.extend(_bytes(f"{where}.{key}", values))
            elif all(isinstance(v, int) and not isinstance(v, bool) for v in values):
                feature.int64_list.value.extend(values)
            elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                feature.float_list.value.extend(values)
            else:
                raise ValueError
        except (ValueError, TypeError, OverflowError):
            raise RequestError(f"{where}.{key}: expected strings, int64s or float32s, got {_short(value)}") from None
    return example


def _single_input(signature):
    """The one input without a default, for requests that send a bare value instead of named inputs."""
    required = [k for k in signature.inputs if k not in signature.defaults]
    if len(required) != 1:
        raise RequestError(f"this signature needs named inputs {sorted(signature.inputs)}")
    return required[0]


def _columns(inputs, signature):
    return inputs if isinstance(inputs, dict) and set(inputs) - {"b64"} else {_single_input(signature): inputs}


def _rows_to_columns(instances, signature):
    if not isinstance(instances, list) or not instances:
        raise RequestError("instances: empty batch" if instances == [] else "instances: expected a list")
    if not all(isinstance(i, dict) and set(i) - {"b64"} for i in instances):
        return {_single_input(signature): instances}
    names = set(instances[0])
    if any(set(i) != names for i in instances):
        raise RequestError("instances: every object must have the same keys")
    return {k: [i[k] for i in instances] for k in names}


def to_array(name, value, info):
    """A JSON value (nested lists; strings as text or {"b64": ...}) as a numpy array of the input's dtype."""
    dtype = tf.as_dtype(info.dtype)
    try:
        array = np.array(_bytes(name, value), dtype=object) if dtype == tf.string else np.array(value)
    except (ValueError, TypeError, RecursionError):
        raise RequestError(f"{name}: not a rectangular list of at most 32 dimensions") from None
    if dtype == tf.string:
        if not all(isinstance(s, bytes) for s in array.flat):
            raise RequestError(f"{name}: not a rectangular list")
        return array
    kinds = "iu" if dtype.is_integer else "iuf" if dtype.is_floating else "b"
    if array.dtype.kind not in kinds:
        raise RequestError(f"{name}: expected {dtype.name}, got {_short(value)}")
    if dtype.is_integer and array.size and (array.min() < dtype.min or array.max() > dtype.max):
        raise RequestError(f"{name}: out of range for {dtype.name}")
    array = array.astype(dtype.as_numpy_dtype)
    if dtype.is_floating and not np.isfinite(array).all():
        raise RequestError(f"{name}: out of range for {dtype.name}")
    return array


def utf8(name, text):
    """A JSON string as UTF-8 bytes; one holding a lone surrogate (`"\\ud800"`, valid JSON) has none."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RequestError(f"{name}: not valid Unicode: a lone surrogate \\u{ord(text[e.start]):04x} at character "
                           f"{e.start}") from None


def _bytes(name, value):
    if isinstance(value, str):
        return utf8(name, value)
    if isinstance(value, dict) and set(value) == {"b64"} and isinstance(value["b64"], str):
        try:
            return base64.b64decode(value["b64"], validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(f"{name}: invalid base64") from None
    if isinstance(value, list):
        return [_bytes(name, v) for v in value]
    raise RequestError(f"{name}: expected a string or {{\"b64\": ...}}, got {_short(value)}")


def _short(value):
    """The start of a JSON value, for an error message."""
    try:
        return json.dumps(value)[:80]
    except (ValueError, RecursionError):
        return "a value nested too deeply"


def to_json(name, array):
    """An output array as TF Serving writes it: text as UTF-8 strings ({"b64": ...} for names ending in `_bytes`),
    float32 in its shortest round-trip form."""
    if array.dtype == object:
        if name.endswith("_bytes"):
            convert = lambda b: {"b64": base64.b64encode(b).decode("ascii")}  # noqa: E731
        else:
            convert = lambda b: b.decode("utf-8", errors="replace")  # noqa: E731
    elif array.dtype.kind == "f":
        array, convert = array.astype(str), float  # numpy's str is the shortest form that round-trips the dtype
    else:
        return array.tolist()
    values = np.empty(array.shape, dtype=object)
    values.flat[:] = [convert(x) for x in array.flat]
    return values.tolist()
