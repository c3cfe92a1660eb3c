"""TF Serving's REST API over the models `capstf serve` serves on gRPC (the same checks, the
same answers), as a WSGI app that waitress runs:

    GET  /v1/models/NAME[/versions/N]             the version's status
    GET  /v1/models/NAME[/versions/N]/metadata    its signatures
    POST /v1/models/NAME[/versions/N]:predict     {"signature_name": ..., "instances": [...]}
                                                  (row format) or {"inputs": ...} (columnar)

A refused request gets TF Serving's error body, {"error": "..."}, with HTTP 400 (bad input) or
404 (no such model, version or path), or 413 (a body over the message limit; waitress itself
refuses one over twice the limit before reading it all).
"""
import json
import re

import grpc
import numpy as np
from google.protobuf import json_format

from capstf.serving.models import Models, RequestError

ROUTE = re.compile(r"^/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>\d+))?(?P<what>/metadata|:predict)?$")
HTTP_STATUS = {grpc.StatusCode.NOT_FOUND: "404 Not Found", grpc.StatusCode.INVALID_ARGUMENT: "400 Bad Request",
               grpc.StatusCode.RESOURCE_EXHAUSTED: "413 Payload Too Large"}


def rest_app(models: Models):
    """The WSGI application answering TF Serving's REST requests from `models`."""
    def app(environ, start_response):
        try:
            status, body = "200 OK", answer(models, environ)
        except RequestError as e:
            status, body = HTTP_STATUS.get(e.code, "400 Bad Request"), {"error": str(e)}
        data = json.dumps(body).encode()
        start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
        return [data]
    return app


def answer(models: Models, environ) -> dict:
    method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
    match = ROUTE.match(path)
    if match is None:
        raise RequestError(grpc.StatusCode.NOT_FOUND, f"Malformed request: {method} {path}")
    version = int(match["version"]) if match["version"] else None
    servable = models.servable(match["name"], version)
    spec = {"name": servable.name, "signature_name": "", "version": str(servable.version)}
    if method == "GET" and match["what"] is None:
        return {"model_version_status": [{"version": str(servable.version), "state": "AVAILABLE",
                                          "status": {"error_code": "OK", "error_message": ""}}]}
    if method == "GET" and match["what"] == "/metadata":
        signatures = json_format.MessageToDict(models.signature_def_map(servable), preserving_proto_field_name=True)
        return {"model_spec": spec, "metadata": {"signature_def": signatures}}
    if method == "POST" and match["what"] == ":predict":
        return predict(models, servable, read_json(environ, models.limits.max_message_bytes))
    raise RequestError(grpc.StatusCode.NOT_FOUND, f"Malformed request: {method} {path}")


def read_json(environ, max_bytes: int) -> dict:
    size = int(environ.get("CONTENT_LENGTH") or 0)
    if size > max_bytes:
        raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"the body has {size} bytes; at most {max_bytes}")
    try:
        body = json.loads(environ["wsgi.input"].read(size))
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"the body is not JSON: {e}") from None
    if not isinstance(body, dict):
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "the body must be a JSON object")
    return body


def predict(models: Models, servable, body: dict) -> dict:
    """TF Serving's predict: the row format in, "predictions" out; the columnar one, "outputs"."""
    signature_name = body.get("signature_name") or "serving_default"
    rows = "instances" in body
    if rows == ("inputs" in body):
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "give exactly one of 'instances' and 'inputs'")
    signature, input_name, spec = models.input_spec(servable, signature_name)
    given = body["instances"] if rows else body["inputs"]
    # One named input: TF Serving takes its values bare, or under its name.
    if rows and isinstance(given, list) and given and all(isinstance(row, dict) for row in given):
        names, given = set().union(*given), [row.get(input_name) for row in given]
    elif not rows and isinstance(given, dict):
        names, given = set(given), given.get(input_name)
    else:
        names = {input_name}
    models.check_input_names(signature_name, input_name, names)
    array = to_array(given, spec.dtype.as_numpy_dtype, input_name)
    models.check_shape(input_name, spec, array.shape)
    outputs = models.run(signature, input_name, array)
    if rows:
        return {"predictions": [{k: v[i].tolist() for k, v in outputs.items()} for i in range(len(array))]}
    return {"outputs": {k: v.tolist() for k, v in outputs.items()}}


def to_array(values, dtype, input_name) -> np.ndarray:
    """JSON numbers as an array of the signature's dtype; uint8 takes whole numbers 0..255 only."""
    try:
        array = np.asarray(values, dtype=np.float64)
    except (ValueError, TypeError):
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"input {input_name!r} must be a nested list of "
                           "numbers of one shape") from None
    if dtype == np.uint8 and not (np.all(array == np.round(array)) and np.all((array >= 0) & (array <= 255))):
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"input {input_name!r} must be whole numbers 0..255")
    return array.astype(dtype)
