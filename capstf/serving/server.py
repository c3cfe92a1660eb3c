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
from google.protobuf.message import DecodeError
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.apis import (get_model_metadata_pb2, predict_pb2, prediction_log_pb2,
                                     prediction_service_pb2_grpc)

from capstf.errors import CapstfError, RuntimeFailure, first_line
from capstf.serving.limits import Limits


class Servable:
    """One exported model version: its signatures and their SignatureDefs (for metadata), warmed
    up with the version's warm-up requests, as TF Serving does, before it serves."""

    def __init__(self, name, version, path: Path):
        self.name, self.version = name, version
        self.loaded = tf.saved_model.load(str(path))
        self.signatures = dict(self.loaded.signatures)
        meta = saved_model_pb2.SavedModel.FromString((path / "saved_model.pb").read_bytes())
        self.signature_defs = dict(meta.meta_graphs[0].signature_def)
        self.warmup_requests = self.warm_up(path / "assets.extra" / "tf_serving_warmup_requests")

    def warm_up(self, records: Path) -> int:
        """Replays the PredictLogs of TF Serving's warm-up file (if any); returns how many."""
        if not records.is_file():
            return 0
        replayed = 0
        for record in tf.data.TFRecordDataset(str(records)).as_numpy_iterator():
            request = prediction_log_pb2.PredictionLog.FromString(record).predict_log.request
            signature = self.signatures[request.model_spec.signature_name or "serving_default"]
            signature(**{key: tf.constant(tf.make_ndarray(value)) for key, value in request.inputs.items()})
            replayed += 1
        return replayed


def newest_versions(root: Path) -> dict:
    """{model name: (version, path)} of the newest OUT/<name>/<version>/ holding a saved_model.pb."""
    newest = {}
    for model in sorted(p for p in root.iterdir() if p.is_dir()):
        versions = sorted((int(v.name), v) for v in model.iterdir()
                          if v.name.isdigit() and (v / "saved_model.pb").is_file())
        if versions:
            newest[model.name] = versions[-1]
    return newest


def load_servable(name, version, path) -> Servable:
    try:
        return Servable(name, version, path)
    except (OSError, ValueError, IndexError, KeyError, tf.errors.OpError, DecodeError) as e:  # a truncated file
        raise CapstfError(f"{path} is not a readable SavedModel ({first_line(e)}); export the model "
                          "again, or remove that version to serve the one before.") from None


def load_servables(export_dir) -> dict:
    """{model name: Servable of its newest version} for every OUT/<name>/<version>/ folder."""
    root = Path(export_dir)
    if not root.is_dir():
        raise CapstfError(f"--export-dir {root} does not exist; run `capstf export` first.")
    servables = {name: load_servable(name, version, path) for name, (version, path) in newest_versions(root).items()}
    if not servables:
        raise CapstfError(f"{root} holds no exported model (expected {root}/<name>/<version>/saved_model.pb).")
    return servables


class VersionWatcher(threading.Thread):
    """Polls the export dir for newer versions, as TF Serving's --file_system_poll_wait_seconds
    does. A newer version is loaded whole, warm-up included, before any request is answered from
    it; one that does not load (still being copied in by hand) is tried again at the next poll,
    and the version served goes on meanwhile. `capstf export` publishes a version by renaming a
    finished folder into place, so it never shows half-written."""

    def __init__(self, root: Path, service, poll_seconds: float, log):
        super().__init__(daemon=True, name="capstf-version-watcher")
        self.root, self.service, self.poll_seconds, self.log = root, service, poll_seconds, log
        self.stopped, self.unloadable = threading.Event(), set()

    def run(self):
        while not self.stopped.wait(self.poll_seconds):
            self.poll()

    def poll(self):
        try:
            newest = newest_versions(self.root)
        except OSError:  # the folder is gone or unreadable for now: keep serving what is loaded
            return
        for name, (version, path) in newest.items():
            served = self.service.servables.get(name)
            if served is not None and served.version >= version or path in self.unloadable:
                continue
            try:
                servable = load_servable(name, version, path)
            except CapstfError as e:
                self.unloadable.add(path)
                self.log(f"not serving {path}: {e}")
                continue
            # One assignment: each request reads the old mapping or the new one, never a mix.
            self.service.servables = {**self.service.servables, name: servable}
            self.log(f"serving {name} version {version} ({servable.warmup_requests} warm-up requests replayed)")


class Server:
    """A running `capstf serve`: the gRPC server and its version watcher; stop() ends both."""

    def __init__(self, grpc_server, watcher):
        self.grpc_server, self.watcher = grpc_server, watcher

    def stop(self, grace=None):
        if self.watcher:
            self.watcher.stopped.set()
        return self.grpc_server.stop(grace)

    def wait_for_termination(self):
        return self.grpc_server.wait_for_termination()


class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, servables, limits: Limits):
        self.servables, self.limits = servables, limits

    def _servable(self, spec, context):
        servable = self.servables.get(spec.name)
        if servable is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"Servable not found for request: model {spec.name!r}; "
                          f"serving {sorted(self.servables)}")
        if spec.HasField("version") and spec.version.value != servable.version:
            context.abort(grpc.StatusCode.NOT_FOUND, f"model {spec.name!r} version {spec.version.value} "
                          f"not found; serving version {servable.version}")
        return servable

    def Predict(self, request, context):
        servable = self._servable(request.model_spec, context)
        signature_name = request.model_spec.signature_name or "serving_default"
        signature = servable.signatures.get(signature_name)
        if signature is None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"signature {signature_name!r} not found; "
                          f"available: {sorted(servable.signatures)}")
        (input_name, spec), = signature.structured_input_signature[1].items()
        if set(request.inputs) != {input_name}:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"signature {signature_name!r} takes exactly one "
                          f"input {input_name!r}, got {sorted(request.inputs)}")
        proto = request.inputs[input_name]
        if proto.dtype != spec.dtype.as_datatype_enum:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"input {input_name!r} must be {spec.dtype.name}, "
                          f"got {tf.dtypes.as_dtype(proto.dtype).name}")
        shape = [d.size for d in proto.tensor_shape.dim]
        if len(shape) != len(spec.shape) or any(s is not None and s != d for s, d in zip(spec.shape, shape)):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"input {input_name!r} must have shape "
                          f"{[s if s is not None else -1 for s in spec.shape]}, got {shape}")
        if not 0 < shape[0] <= self.limits.max_images:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"batch size must be 1..{self.limits.max_images}, "
                          f"got {shape[0]}")
        if (sent := values_in(proto)) != np.prod(shape):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"input {input_name!r} declares shape {shape} "
                          f"({np.prod(shape)} values) but holds {sent}: send every value")
        try:
            array = tf.make_ndarray(proto)
            outputs = signature(**{input_name: tf.constant(array)})  # TensorFlow runs concurrent calls
        except (tf.errors.InvalidArgumentError, ValueError, TypeError) as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, first_line(e))
        response = predict_pb2.PredictResponse()
        response.model_spec.name, response.model_spec.signature_name = servable.name, signature_name
        response.model_spec.version.value = servable.version
        output_filter = set(request.output_filter) or set(outputs)
        for key in output_filter:
            if key not in outputs:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"output_filter names unknown output {key!r}")
            response.outputs[key].CopyFrom(tf.make_tensor_proto(np.asarray(outputs[key])))
        return response

    def GetModelMetadata(self, request, context):
        servable = self._servable(request.model_spec, context)
        unsupported = set(request.metadata_field) - {"signature_def"}
        if unsupported or not request.metadata_field:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "metadata_field must be ['signature_def']")
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = servable.name
        response.model_spec.version.value = servable.version
        signatures = get_model_metadata_pb2.SignatureDefMap()
        for key, value in servable.signature_defs.items():
            signatures.signature_def[key].CopyFrom(value)
        response.metadata["signature_def"].Pack(signatures)
        return response


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
                 poll_seconds=1.0, log=lambda message: None):
    """Starts serving in background threads; returns (Server, bound port, [(name, servable)]).
    With tls_cert and tls_key (PEM files), only over TLS. Every poll_seconds (0: never) newer
    versions in export_dir are loaded and served (log says so)."""
    credentials = server_credentials(tls_cert, tls_key)
    service = PredictionService(load_servables(export_dir), limits)
    options = [("grpc.max_receive_message_length", limits.max_message_bytes),
               ("grpc.max_send_message_length", limits.max_message_bytes)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=options,
                         maximum_concurrent_rpcs=limits.max_concurrent_rpcs)
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(service, server)
    try:
        bound = (server.add_secure_port(f"{host}:{port}", credentials) if credentials
                 else server.add_insecure_port(f"{host}:{port}"))
    except RuntimeError:
        bound = 0
    if not bound:
        raise RuntimeFailure(f"Cannot listen on {host}:{port} (in use, or not an address of this machine).")
    server.start()
    watcher = VersionWatcher(Path(export_dir), service, poll_seconds, log) if poll_seconds else None
    if watcher:
        watcher.start()
    return Server(server, watcher), bound, sorted(service.servables.items())
