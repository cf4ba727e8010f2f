"""The gRPC front of `tfglm serve`: TF Serving's PredictionService (Predict, Classify, Regress, GetModelMetadata) and
ModelService (GetModelStatus); MultiInference and HandleReloadConfigRequest answer UNIMPLEMENTED.

grpc's own limits apply: a request of at most `max_request_bytes` (`grpc.max_receive_message_length`), `num_threads`
handler threads, and at most `max_enqueued_requests` RPCs at once (both RESOURCE_EXHAUSTED beyond). A tensor's
declared shape is checked against the values it holds before any array is built (`to_array`).
"""

import logging
import math
from concurrent.futures import ThreadPoolExecutor

import grpc
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2
from tensorflow_serving.apis import (classification_pb2, get_model_metadata_pb2, model_service_pb2_grpc, predict_pb2,
                                     prediction_service_pb2_grpc, regression_pb2)

from tfglm.errors import TfglmError
from tfglm.serving.checks import CODES, RequestError

log = logging.getLogger("tfglm")
MAX_RESPONSE_BYTES = 64 << 20
VALUE_FIELDS = [f.name for f in tensor_pb2.TensorProto.DESCRIPTOR.fields if f.name.endswith("_val")]


def start(core, host, port):
    """(the running gRPC server, its port)."""
    grpc_server = grpc.server(
        ThreadPoolExecutor(core.num_threads, thread_name_prefix="tfglm-grpc"),
        maximum_concurrent_rpcs=core.admission.limit,
        options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", core.max_request_bytes),
                 ("grpc.max_send_message_length", MAX_RESPONSE_BYTES)])
    service = Service(core)
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(service, grpc_server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(service, grpc_server)
    try:
        bound = grpc_server.add_insecure_port(f"{host}:{port}")
    except RuntimeError:
        bound = 0
    if not bound:
        raise TfglmError(f"--port {port}: cannot bind {host}:{port} (in use?)")
    grpc_server.start()
    return grpc_server, bound


def to_array(name, proto):
    """A TensorProto as a numpy array, once its declared shape is known to match the values it holds: otherwise a
    message of a few bytes could declare a tensor of gigabytes, which `tf.make_ndarray` would allocate and fill."""
    try:
        dtype = tf.as_dtype(proto.dtype)
        dims = [d.size for d in proto.tensor_shape.dim]
        if proto.tensor_shape.unknown_rank or any(d < 0 for d in dims):
            raise ValueError(f"a shape of unknown size {dims}")
        if proto.tensor_content:
            if dtype == tf.string or len(proto.tensor_content) % dtype.size:
                raise ValueError(f"tensor_content of {len(proto.tensor_content)} bytes for {dtype.name}")
            held = len(proto.tensor_content) // dtype.size
        else:
            held = sum(len(getattr(proto, field)) for field in VALUE_FIELDS)
        if held != math.prod(dims):
            raise ValueError(f"shape {dims} declares {math.prod(dims)} values; the tensor holds {held}")
        return tf.make_ndarray(proto)
    except (TypeError, ValueError) as e:
        raise RequestError(f"{name}: {e}") from None


def _examples(input):
    """Serialized tf.Examples of a Classify or Regress request's Input."""
    kind = input.WhichOneof("kind")
    if kind == "example_list":
        examples = list(input.example_list.examples)
    elif kind == "example_list_with_context":
        examples = []
        for example in input.example_list_with_context.examples:
            merged = tf.train.Example()
            merged.CopyFrom(input.example_list_with_context.context)
            merged.MergeFrom(example)
            examples.append(merged)
    else:
        raise RequestError("Input is empty")
    return [e.SerializeToString() for e in examples]


class Service(prediction_service_pb2_grpc.PredictionServiceServicer, model_service_pb2_grpc.ModelServiceServicer):
    """Both services; each RPC is measured (metrics), and model work is admitted through the server's queue bound."""

    def __init__(self, core):
        self.core = core

    def _serve(self, context, handle):
        """`handle(labels)`'s response; a RequestError ends the RPC with TF Serving's status code."""
        try:
            with self.core.metrics.request() as labels:
                return handle(labels)
        except RequestError as e:
            error = e
        except Exception as e:  # a server fault: report it, keep serving
            log.exception("gRPC %s", type(e).__name__)
            error = RequestError(f"{type(e).__name__}: {e}", 500)
        context.abort(getattr(grpc.StatusCode, CODES.get(error.status, "INTERNAL")), str(error))

    @staticmethod
    def _version(spec):
        """(version, label) of a ModelSpec, either or both None."""
        choice = spec.WhichOneof("version_choice")
        return (spec.version.value if choice == "version" else None,
                spec.version_label if choice == "version_label" else None)

    def _servable(self, spec, labels):
        return self.core.servable(spec.name, *self._version(spec), labels)

    @staticmethod
    def _signature(servable, spec, labels):
        name = spec.signature_name or "serving_default"
        servable.signature(name)
        labels["signature"] = name
        return name

    @staticmethod
    def _spec(response, servable, signature_name):
        response.model_spec.name, response.model_spec.signature_name = servable.name, signature_name
        response.model_spec.version.value = servable.version

    def Predict(self, request, context):
        def handle(labels):
            servable = self._servable(request.model_spec, labels)
            signature_name = self._signature(servable, request.model_spec, labels)
            servable.check_input_names(signature_name, request.inputs)
            inputs = {k: to_array(k, v) for k, v in request.inputs.items()}
            with self.core.admission():
                outputs = servable.predict(signature_name, inputs)
            unknown = set(request.output_filter) - set(outputs)
            if unknown:
                raise RequestError(f"output_filter: no outputs {sorted(unknown)} in signature {signature_name!r}")
            response = predict_pb2.PredictResponse()
            self._spec(response, servable, signature_name)
            for name in request.output_filter or outputs:
                response.outputs[name].CopyFrom(tf.make_tensor_proto(outputs[name]))
            return response

        return self._serve(context, handle)

    def _run_examples(self, request, labels, method):
        """(servable, signature name, result) of a Classify or Regress `request`: its tf.Examples through the
        servable's `method` ("classify" or "regress"), admitted through the queue bound."""
        servable = self._servable(request.model_spec, labels)
        signature_name = self._signature(servable, request.model_spec, labels)
        examples = _examples(request.input)
        with self.core.admission():
            return servable, signature_name, getattr(servable, method)(signature_name, examples)

    def Classify(self, request, context):
        def handle(labels):
            servable, signature_name, rows = self._run_examples(request, labels, "classify")
            response = classification_pb2.ClassificationResponse()
            self._spec(response, servable, signature_name)
            for row in rows:
                response.result.classifications.add().classes.extend(
                    classification_pb2.Class(label=label, score=score) for label, score in row)
            return response

        return self._serve(context, handle)

    def Regress(self, request, context):
        def handle(labels):
            servable, signature_name, values = self._run_examples(request, labels, "regress")
            response = regression_pb2.RegressionResponse()
            self._spec(response, servable, signature_name)
            response.result.regressions.extend(regression_pb2.Regression(value=v) for v in values)
            return response

        return self._serve(context, handle)

    def GetModelMetadata(self, request, context):
        def handle(labels):
            servable = self._servable(request.model_spec, labels)
            if list(request.metadata_field) != ["signature_def"]:
                raise RequestError(f"Metadata field {list(request.metadata_field)} is not supported "
                                   "(only ['signature_def'])")
            response = get_model_metadata_pb2.GetModelMetadataResponse()
            response.model_spec.name = servable.name
            response.model_spec.version.value = servable.version
            response.metadata["signature_def"].Pack(
                get_model_metadata_pb2.SignatureDefMap(signature_def=servable.signature_defs))
            return response

        return self._serve(context, handle)

    def GetModelStatus(self, request, context):
        def handle(labels):
            status = self.core.model(request.model_spec.name).status(*self._version(request.model_spec))
            labels["model"] = request.model_spec.name
            return status

        return self._serve(context, handle)
