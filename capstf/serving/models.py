"""The exported models `capstf serve` serves, whatever the API: each model's newest version,
loaded and warmed up, newer versions picked up while serving, and the checks every request
passes (`Models`; a refused one raises RequestError with its gRPC status code)."""
import re
import threading
from pathlib import Path

import grpc
import numpy as np
import tensorflow as tf
from google.protobuf.message import DecodeError
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.apis import get_model_metadata_pb2, prediction_log_pb2

from capstf.errors import CapstfError, first_line
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

    def __init__(self, root: Path, models, poll_seconds: float, log):
        super().__init__(daemon=True, name="capstf-version-watcher")
        self.root, self.models, self.poll_seconds, self.log = root, models, poll_seconds, log
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
            served = self.models.servables.get(name)
            if served is not None and served.version >= version or path in self.unloadable:
                continue
            try:
                servable = load_servable(name, version, path)
            except CapstfError as e:
                self.unloadable.add(path)
                self.log(f"not serving {path}: {e}")
                continue
            # One assignment: each request reads the old mapping or the new one, never a mix.
            self.models.servables = {**self.models.servables, name: servable}
            self.log(serving_line(name, servable))


def serving_line(name: str, servable) -> str:
    """The line `capstf serve` prints for each version it serves, at start-up and when the
    watcher loads a new one."""
    return f"serving {name} version {servable.version} ({servable.warmup_requests} warm-up requests replayed)"


class RequestError(Exception):
    """A request refused: its gRPC status code (REST maps it to an HTTP status) and why."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


class Models:
    """What both APIs serve: the newest version of each model, and its checks of a request."""

    def __init__(self, servables, limits: Limits):
        self.servables, self.limits = servables, limits

    def servable(self, name: str, version=None) -> Servable:
        servable = self.servables.get(name)  # one read: a version swapped in meanwhile is not mixed in
        if servable is None:
            raise RequestError(grpc.StatusCode.NOT_FOUND, f"Servable not found for request: model {name!r}; "
                               f"serving {sorted(self.servables)}")
        if version is not None and version != servable.version:
            raise RequestError(grpc.StatusCode.NOT_FOUND, f"model {name!r} version {version} not found; "
                               f"serving version {servable.version}")
        return servable

    @staticmethod
    def input_spec(servable: Servable, signature_name: str):
        """(the signature, its one input's name, that input's TensorSpec)."""
        signature = servable.signatures.get(signature_name)
        if signature is None:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"signature {signature_name!r} not found; "
                               f"available: {sorted(servable.signatures)}")
        (input_name, spec), = signature.structured_input_signature[1].items()
        return signature, input_name, spec

    @staticmethod
    def check_input_names(signature_name, input_name, given_names):
        if set(given_names) != {input_name}:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"signature {signature_name!r} takes exactly "
                               f"one input {input_name!r}, got {sorted(given_names)}")

    def check_shape(self, input_name, spec, shape):
        if len(shape) != len(spec.shape) or any(s is not None and s != d for s, d in zip(spec.shape, shape)):
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"input {input_name!r} must have shape "
                               f"{[s if s is not None else -1 for s in spec.shape]}, got {list(shape)}")
        if not 0 < shape[0] <= self.limits.max_images:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"batch size must be 1..{self.limits.max_images}, "
                               f"got {shape[0]}")

    @staticmethod
    def run(signature, input_name, array) -> dict:
        try:
            outputs = signature(**{input_name: tf.constant(array)})  # TensorFlow runs concurrent calls
        except tf.errors.InvalidArgumentError as e:  # the graph's own checks: say which one failed
            failed = re.search(r"assertion failed: \[(.*?)\](?: \[|\n|$)", e.message)
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, failed[1] if failed else first_line(e)) from None
        except (ValueError, TypeError) as e:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, first_line(e)) from None
        return {k: np.asarray(v) for k, v in outputs.items()}

    def signature_def_map(self, servable: Servable):
        signatures = get_model_metadata_pb2.SignatureDefMap()
        for key, value in servable.signature_defs.items():
            signatures.signature_def[key].CopyFrom(value)
        return signatures
