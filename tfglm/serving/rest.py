"""The REST front of `tfglm serve`: TF Serving's REST API, on the HTTP server of `tfglm.serving.http`.

    GET  /v1/models/NAME[/versions/N | /labels/L]             model status
    GET  /v1/models/NAME[/versions/N | /labels/L]/metadata    signatures
    POST /v1/models/NAME[/versions/N | /labels/L]:predict     row (`instances`) or columnar (`inputs`) format
    POST /v1/models/NAME[/versions/N | /labels/L]:classify    tf.Example features as JSON; likewise :regress
    GET  /monitoring/prometheus/metrics

Errors are TF Serving's `{"error": message}`; JSON turns into tensors and back through `tfglm.serving.codec`.
"""

import asyncio
import logging
import re

import prometheus_client
from google.protobuf import json_format
from starlette.responses import Response
from starlette.routing import Route
from tensorflow_serving.apis import get_model_metadata_pb2

from tfglm.serving import codec
from tfglm.serving.checks import RequestError
from tfglm.serving.http import error_response, json_response, read_body

log = logging.getLogger("tfglm")
ROUTE = re.compile(r"/v1/models/([^/:]+)(?:/versions/(\d+)|/labels/([^/:]+))?(/metadata|:predict|:classify|:regress)?")
METHODS = {None: "GET", "/metadata": "GET", ":predict": "POST", ":classify": "POST", ":regress": "POST"}
METRICS = "/monitoring/prometheus/metrics"


def routes(core, pool):
    """The Starlette routes of TF Serving's REST API and the metrics; model work runs on `pool`."""

    async def models(request):
        try:
            with core.metrics.request() as labels:
                return await _models(request, labels)
        except RequestError as e:
            return error_response(e.status, str(e), e.headers)
        except Exception as e:  # a server fault: report it, keep serving
            log.exception("REST %s %s", request.method, request.scope["path"])
            return error_response(500, f"{type(e).__name__}: {e}")

    async def _models(request, labels):
        path = request.scope["path"]
        match = ROUTE.fullmatch(path)
        if not match:
            raise RequestError(f"Malformed request: {request.method} {path}", 404)
        name, version, label, action = match.groups()
        route = (name, int(version) if version else None, label)
        allowed = METHODS[action]
        if request.method not in ({"GET", "HEAD"} if allowed == "GET" else {"POST"}):
            raise RequestError(f"{request.method} is not allowed on {path}; use {allowed}", 405, {"Allow": allowed})
        if action is None:
            status = core.model(name).status(*route[1:])
            labels["model"] = name
            return json_response(json_format.MessageToDict(status, always_print_fields_with_no_presence=True,
                                                           preserving_proto_field_name=True))
        if action == "/metadata":
            return json_response(metadata(core.servable(*route, labels)))
        body = await read_body(request, core.max_request_bytes, core.read_timeout_s)
        handle = {":predict": predict, ":classify": classify, ":regress": regress}[action]
        with core.admission():
            response = await asyncio.get_running_loop().run_in_executor(pool, handle, core, route, body, labels)
        return json_response(response)

    async def metrics(request):
        return Response(core.metrics.exposition(), media_type=prometheus_client.CONTENT_TYPE_LATEST)

    return [Route("/v1/models/{path:path}", models, methods=["GET", "POST"]),
            Route(METRICS, metrics, methods=["GET"])]


def metadata(servable):
    """TF Serving's REST metadata JSON: the model spec and its SignatureDefMap."""
    signatures = get_model_metadata_pb2.SignatureDefMap(signature_def=servable.signature_defs)
    return {"model_spec": {"name": servable.name, "signature_name": "", "version": str(servable.version)},
            "metadata": {"signature_def": json_format.MessageToDict(signatures, preserving_proto_field_name=True)}}


def predict(core, route, body, labels):
    """The JSON response to a predict request `body` (bytes), row or columnar format."""
    request = codec.json_object(body)
    row = codec.is_row_format(request)
    servable = core.servable(*route, labels)
    signature_name = _signature_name(request, servable, labels)
    signature = servable.signature_defs[signature_name]
    columns = codec.predict_columns(request, signature)
    servable.check_input_names(signature_name, columns)
    inputs = {k: codec.to_array(k, v, signature.inputs[k]) for k, v in columns.items()}
    return codec.predict_response(servable.predict(signature_name, inputs), row)


def classify(core, route, body, labels):
    """{"result": [[[label, score], ...] per example]}."""
    request = codec.json_object(body)
    servable = core.servable(*route, labels)
    rows = servable.classify(_signature_name(request, servable, labels), codec.examples(request))
    return {"result": [[list(pair) for pair in row] for row in rows]}


def regress(core, route, body, labels):
    """{"result": [value per example]}."""
    request = codec.json_object(body)
    servable = core.servable(*route, labels)
    return {"result": servable.regress(_signature_name(request, servable, labels), codec.examples(request))}


def _signature_name(request, servable, labels):
    name = request.get("signature_name") or "serving_default"
    servable.signature(name)  # 400 unless a string naming a signature
    labels["signature"] = name
    return name
