"""`capstf serve`: TF Serving's gRPC PredictionService (Predict, GetModelMetadata) on exports.

A stand-in for tensorflow/serving where that cannot run (CI, a laptop): the same API, from
tensorflow-serving-api's generated code, over the SavedModels `capstf export` wrote. Every bad
request is answered with INVALID_ARGUMENT or NOT_FOUND and the server keeps serving. Its work is
bounded (Limits): requests beyond `max_concurrent_rpcs` get RESOURCE_EXHAUSTED, messages are
capped in bytes, requests in images, and a request must carry every value of the shape it
declares (TensorFlow would repeat a short proto's last value to fill it, so a 100-byte request
could otherwise cost a full batch). Without a certificate it serves in the clear, unauthenticated.
"""
import threading
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import tensorflow as tf
import waitress
from tensorflow_serving.apis import get_model_metadata_pb2, predict_pb2, prediction_service_pb2_grpc

from capstf.errors import CapstfError, RuntimeFailure
from capstf.serving.limits import Limits
from capstf.serving.models import Models, RequestError, VersionWatcher, load_servables
from capstf.serving.rest import rest_app


class Server:
    """A running `capstf serve`: the gRPC server, its REST server (if any, on rest_port) and
    its version watcher (if any); stop() ends them all."""

    def __init__(self, grpc_server, rest_server, watcher):
        self.grpc_server, self.rest_server, self.watcher = grpc_server, rest_server, watcher
        self.rest_port = rest_server.effective_port if rest_server else None

    def stop(self, grace=None):
        if self.watcher:
            self.watcher.stopped.set()
        if self.rest_server:
            self.rest_server.close()
        return self.grpc_server.stop(grace)

    def wait_for_termination(self):
        return self.grpc_server.wait_for_termination()

class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    """TF Serving's gRPC API over `Models`."""

    def __init__(self, models: Models):
        self.models = models

    def Predict(self, request, context):
        try:
            return self._predict(request)
        except RequestError as e:
            context.abort(e.code, str(e))

    def _predict(self, request):
        servable = self.models.servable(*name_and_version(request.model_spec))
        signature_name = request.model_spec.signature_name or "serving_default"
        signature, input_name, input_spec = self.models.input_spec(servable, signature_name)
        self.models.check_input_names(signature_name, input_name, request.inputs)
        proto = request.inputs[input_name]
        if proto.dtype != input_spec.dtype.as_datatype_enum:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"input {input_name!r} must be "
                               f"{input_spec.dtype.name}, got {tf.dtypes.as_dtype(proto.dtype).name}")
        shape = [d.size for d in proto.tensor_shape.dim]
        self.models.check_shape(input_name, input_spec, shape)
        if (sent := values_in(proto)) != np.prod(shape):
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"input {input_name!r} declares shape {shape} "
                               f"({np.prod(shape)} values) but holds {sent}: send every value")
        outputs = self.models.run(signature, input_name, tf.make_ndarray(proto))
        response = predict_pb2.PredictResponse()
        response.model_spec.name, response.model_spec.signature_name = servable.name, signature_name
        response.model_spec.version.value = servable.version
        for key in set(request.output_filter) or set(outputs):
            if key not in outputs:
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"output_filter names unknown output {key!r}")
            response.outputs[key].CopyFrom(tf.make_tensor_proto(outputs[key]))
        return response

    def GetModelMetadata(self, request, context):
        try:
            servable = self.models.servable(*name_and_version(request.model_spec))
            if set(request.metadata_field) != {"signature_def"}:
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "metadata_field must be ['signature_def']")
        except RequestError as e:
            context.abort(e.code, str(e))
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = servable.name
        response.model_spec.version.value = servable.version
        response.metadata["signature_def"].Pack(self.models.signature_def_map(servable))
        return response


def name_and_version(model_spec):
    """(model name, the version asked for or None) of a request's ModelSpec."""
    return model_spec.name, model_spec.version.value if model_spec.HasField("version") else None


def values_in(proto) -> int:
    """How many values a TensorProto carries (in its raw bytes, or in its typed list)."""
    if proto.tensor_content:
        return len(proto.tensor_content) // tf.dtypes.as_dtype(proto.dtype).size
    return max(len(proto.float_val), len(proto.int_val), len(proto.double_val), len(proto.half_val),
               len(proto.int64_val))


def server_credentials(tls_cert, tls_key):
    """grpc's TLS credentials from PEM files, or None (both unset)."""
    if not tls_cert and not tls_key:
        return None
    if not (tls_cert and tls_key):
        raise CapstfError("TLS needs both --tls-cert and --tls-key.")
    try:
        pair = (Path(tls_key).read_bytes(), Path(tls_cert).read_bytes())
    except OSError as e:
        raise CapstfError(f"Cannot read {e.filename}: {e.strerror}.") from None
    return grpc.ssl_server_credentials([pair])


def start_server(export_dir, host="127.0.0.1", port=8500, workers=4, limits=Limits(), tls_cert=None, tls_key=None,
                 poll_seconds=1.0, log=lambda message: None, rest_port=None):
    """Starts serving in background threads; returns (Server, bound gRPC port, [(name, servable)]).
    With tls_cert and tls_key (PEM files), gRPC only over TLS. rest_port: TF Serving's REST API
    there too (0: any free port; plain HTTP). Every poll_seconds (0: never) newer versions in
    export_dir are loaded and served (log says so)."""
    credentials = server_credentials(tls_cert, tls_key)
    models = Models(load_servables(export_dir), limits)
    options = [("grpc.max_receive_message_length", limits.max_message_bytes),
               ("grpc.max_send_message_length", limits.max_message_bytes)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=options,
                         maximum_concurrent_rpcs=limits.max_concurrent_rpcs)
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(PredictionService(models), server)
    try:
        bound = (server.add_secure_port(f"{host}:{port}", credentials) if credentials
                 else server.add_insecure_port(f"{host}:{port}"))
    except RuntimeError:
        bound = 0
    if not bound:
        raise RuntimeFailure(f"Cannot listen on {host}:{port} (in use, or not an address of this machine).")
    rest_server = None
    if rest_port is not None:
        try:
            rest_server = waitress.create_server(rest_app(models), host=host, port=rest_port, threads=workers,
                                                 max_request_body_size=2 * limits.max_message_bytes)
        except OSError as e:
            raise RuntimeFailure(f"Cannot listen on {host}:{rest_port} for REST ({e.strerror}).") from None
        threading.Thread(target=rest_server.run, daemon=True, name="capstf-rest").start()
    server.start()
    watcher = VersionWatcher(Path(export_dir), models, poll_seconds, log) if poll_seconds else None
    if watcher:
        watcher.start()
    return Server(server, rest_server, watcher), bound, sorted(models.servables.items())
