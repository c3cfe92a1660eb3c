"""`capstf predict`: images from files -> TF Serving (gRPC, or REST with --rest) -> classes."""
import json
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from capstf.errors import CapstfError, RuntimeFailure


def read_images(paths) -> tuple:
    """PNG, .npy or IDX files -> (float32 [n, H, W, C] in [0, 1], the file of each image).

    A PNG keeps its colour (grey: C = 1; colour: C = 3, alpha dropped); an array is [H, W],
    [N, H, W] or [N, H, W, C], uint8 (0..255) or float (0..1); IDX files hold [N, H, W].
    """
    from capstf.data.sources import IMAGES_MAGIC, read_idx
    arrays, names = [], []
    for path in map(Path, paths):
        if not path.is_file():
            raise CapstfError(f"{path}: no such file.")
        suffix = "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix
        if suffix == ".png":
            from PIL import Image, UnidentifiedImageError
            try:
                with Image.open(path) as image:
                    grey = image.mode in ("1", "L", "LA", "I", "I;16", "F")
                    array = np.asarray(image.convert("L" if grey else "RGB"))[None]
            except (UnidentifiedImageError, OSError) as e:
                raise CapstfError(f"{path}: not a readable PNG ({e}).") from None
        elif suffix == ".npy":
            try:
                array = np.load(path, allow_pickle=False)
            except (ValueError, EOFError, OSError) as e:  # EOFError: a truncated file
                raise CapstfError(f"{path}: not a readable .npy array ({e or 'the file is truncated'}).") from None
            if array.dtype.kind not in "biuf":  # bool, integers, floats: pixels; not text or complex
                raise CapstfError(f"{path}: expected pixel values (integers or floats), got dtype {array.dtype}.")
        else:  # IDX, raw or gzipped
            array = read_idx(path, IMAGES_MAGIC)
        array = array[None] if array.ndim == 2 else array
        array = array[..., None] if array.ndim == 3 else array
        if array.ndim != 4 or not 1 <= array.shape[-1] <= 4:
            raise CapstfError(f"{path}: expected images [H, W], [N, H, W] or [N, H, W, C] (C at most 4), "
                              f"got {list(array.shape)}.")
        arrays.append(array.astype(np.float32) / 255.0 if array.dtype == np.uint8 else array.astype(np.float32))
        names += [f"{path}[{i}]" for i in range(len(array))] if len(array) > 1 else [str(path)]
    shapes = {a.shape[1:] for a in arrays}
    if len(shapes) > 1:
        raise CapstfError(f"The images have different shapes {sorted(shapes)}; send one shape at a time.")
    return np.concatenate(arrays), names


def channel_to(server, tls_ca=None):
    """A gRPC channel to HOST:PORT: in the clear, or over TLS trusting the PEM certificate(s) in tls_ca."""
    import grpc
    if not tls_ca:
        return grpc.insecure_channel(server)
    try:
        roots = Path(tls_ca).read_bytes()
    except OSError as e:
        raise CapstfError(f"Cannot read --tls-ca {tls_ca}: {e.strerror}.") from None
    return grpc.secure_channel(server, grpc.ssl_channel_credentials(root_certificates=roots))


def predict_grpc(server, model_name, signature, images, timeout=10.0, tls_ca=None) -> dict:
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model_name
    request.model_spec.signature_name = signature
    request.inputs["images"].CopyFrom(tf.make_tensor_proto(images))
    with channel_to(server, tls_ca) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        try:
            response = stub.Predict(request, timeout=timeout)
        except grpc.RpcError as e:
            raise RuntimeFailure(_rpc_message(server, e)) from None
    return {k: tf.make_ndarray(v) for k, v in response.outputs.items()}


def metadata_grpc(server, model_name, timeout=10.0, tls_ca=None) -> dict:
    import grpc
    from tensorflow_serving.apis import get_model_metadata_pb2, prediction_service_pb2_grpc
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = model_name
    with channel_to(server, tls_ca) as channel:
        try:
            response = prediction_service_pb2_grpc.PredictionServiceStub(channel).GetModelMetadata(request, timeout=timeout)
        except grpc.RpcError as e:
            raise RuntimeFailure(_rpc_message(server, e)) from None
    signatures = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(signatures)
    from tensorflow import as_dtype
    describe = lambda tensors: {k: {"dtype": as_dtype(v.dtype).name, "shape": [d.size for d in v.tensor_shape.dim]}
                                for k, v in tensors.items()}
    return {"model": response.model_spec.name, "version": response.model_spec.version.value,
            "signatures": {name: {"inputs": describe(s.inputs), "outputs": describe(s.outputs)}
                           for name, s in signatures.signature_def.items() if not name.startswith("__")}}


def predict_rest(server, model_name, signature, images, timeout=10.0) -> dict:
    body = json.dumps({"signature_name": signature, "inputs": {"images": images.tolist()}}).encode()
    url = f"http://{server}/v1/models/{model_name}:predict"
    request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            outputs = json.loads(reply.read())["outputs"]
    except urllib.error.HTTPError as e:
        raise CapstfError(f"{url}: HTTP {e.code}: {e.read().decode(errors='replace')[:500]}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        raise RuntimeFailure(f"Cannot reach TF Serving's REST API at {url}: {getattr(e, 'reason', e)}.") from None
    return {k: np.asarray(v) for k, v in outputs.items()}


def _rpc_message(server, error) -> str:
    import grpc
    code = error.code()
    if code == grpc.StatusCode.UNAVAILABLE:
        return f"Cannot reach a TF Serving gRPC server at {server} ({error.details()})."
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"{server} did not answer in time (raise --timeout?)."
    return f"{server}: {code.name}: {error.details()}"
