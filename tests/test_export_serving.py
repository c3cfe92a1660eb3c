"""Export a small trained model, load it without capstf, compare SavedModel, in-memory and
ONNX outputs, and exercise the gRPC client against `capstf serve` on loopback."""
import json
import re
import shutil
import socket
import subprocess
import sys

import grpc
import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner
from conftest import differences_in_exported_files, model_from_checkpoint_files, small_config
from tensorflow.core.framework import tensor_shape_pb2
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from capstf.cli import main
from capstf.errors import CapstfError, RuntimeFailure
from capstf.export import export
from capstf.serving import client
from capstf.serving.limits import Limits
from capstf.serving.models import load_servables
from capstf.serving.server import start_server
from capstf.checkpoints import restore_for_inference


@pytest.fixture(scope="module")
def exported(trained_mnist, tmp_path_factory):
    model_dir, cfg = trained_mnist
    root = tmp_path_factory.mktemp("export")
    shutil.copytree(model_dir, root / "model")
    report = export(root / "model", root / "out")
    return root, cfg, report


@pytest.fixture(scope="module")
def server(exported):
    """Serves version 1 alone: a copy, so versions other tests export do not reach it."""
    root, _, _ = exported
    shutil.copytree(root / "out" / "capsnet" / "1", root / "served" / "capsnet" / "1")
    grpc_server, port, _ = start_server(root / "served", port=0)
    yield f"127.0.0.1:{port}"
    grpc_server.stop(0)


def digits(count=8):
    from capstf.data.sources import load_examples
    return load_examples("sample", "test").images[:count].astype(np.float32)[..., None] / 255


def test_export_writes_tf_serving_layout_and_a_verified_report(exported):
    root, cfg, report = exported
    assert (root / "out" / "capsnet" / "1" / "saved_model.pb").is_file()
    assert (root / "out" / "capsnet.onnx").is_file()
    saved = json.loads((root / "out" / "capsnet.export_report.json").read_text())
    assert saved == json.loads(json.dumps(report))
    # The report's differences, recomputed here from the files: a report that claimed a check it
    # did not make (or made on other outputs) would not match them.
    images = digits(64)  # what export verifies on: the first 64 test digits, unshifted
    expected = model_from_checkpoint_files(root / "model")(tf.constant(images))["probabilities"].numpy()
    recomputed = differences_in_exported_files(root / "out", images, expected)
    assert report["verified_on"] == "64 real mnist test examples" and set(recomputed) == {"savedmodel", "onnx"}
    for fmt, difference in recomputed.items():  # float32 rounding; a false claim is far off
        assert report[fmt]["max_abs_difference"]["probabilities"] == pytest.approx(difference, abs=1e-6)
    served = tf.saved_model.load(str(root / "out" / "capsnet" / "1")).signatures["predict_uint8"]
    from_bytes = served(images=tf.constant(np.round(images * 255).astype(np.uint8)))["probabilities"].numpy()
    assert report["savedmodel"]["predict_uint8_max_abs_difference"]["probabilities"] == pytest.approx(
        np.max(np.abs(from_bytes.astype(np.float64) - expected)), abs=1e-6)  # the sample digits are whole bytes
    assert not [p for p in (root / "out" / "capsnet").iterdir() if p.name.startswith(".")]  # no scratch left
    assert b"_XlaMustCompile" not in (root / "out" / "capsnet" / "1" / "saved_model.pb").read_bytes()


def test_export_writes_a_warmup_request_per_signature_and_serving_replays_them(exported):
    from tensorflow_serving.apis import prediction_log_pb2
    root, _, _ = exported
    records = root / "out" / "capsnet" / "1" / "assets.extra" / "tf_serving_warmup_requests"  # TF Serving's place
    logs = [prediction_log_pb2.PredictionLog.FromString(r) for r in tf.data.TFRecordDataset(str(records)).as_numpy_iterator()]
    requests = {log.predict_log.request.model_spec.signature_name: log.predict_log.request for log in logs}
    assert sorted(requests) == ["predict_uint8", "serving_default"] and len(logs) == 2
    first = digits(1)  # the first verification image, as floats and as bytes
    np.testing.assert_array_equal(tf.make_ndarray(requests["serving_default"].inputs["images"]), first)
    np.testing.assert_array_equal(tf.make_ndarray(requests["predict_uint8"].inputs["images"]),
                                  np.round(first * 255).astype(np.uint8))
    assert load_servables(root / "out")["capsnet"].warmup_requests == 2


def test_next_export_gets_the_next_version_and_existing_versions_are_refused(exported):
    root, _, _ = exported
    with pytest.raises(CapstfError, match="already exists"):
        export(root / "model", root / "out", version=1, formats=("savedmodel",))
    report = export(root / "model", root / "out", formats=("savedmodel",))
    assert report["savedmodel"]["path"].endswith("capsnet/2")


def test_an_onnx_failure_publishes_neither_format(trained_mnist, tmp_path, monkeypatch):
    import tf2onnx
    monkeypatch.setattr(tf2onnx.convert, "from_function", lambda *a, **k: (_ for _ in ()).throw(ValueError("no op")))
    with pytest.raises(RuntimeFailure, match=r"ONNX conversion failed \(ValueError: no op\); nothing was exported"):
        export(trained_mnist[0], tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").rglob("*")] == ["capsnet"]  # an empty folder: no version, no scratch


def test_export_without_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(small_config().to_dict()))
    result = CliRunner().invoke(main, ["export", "--model-dir", str(tmp_path), "--export-dir", str(tmp_path / "o")])
    assert result.exit_code == 2 and "no checkpoint" in result.output
    assert not (tmp_path / "o").exists()


FRESH_PROCESS = """
import sys, json, numpy as np
sys.modules["capstf"] = None  # importing capstf now fails: the SavedModel must not need it
import tensorflow as tf
model = tf.saved_model.load(sys.argv[1])
images = np.load(sys.argv[2])
out = model.signatures["serving_default"](images=tf.constant(images))
raw = model.signatures["predict_uint8"](images=tf.constant(np.round(images * 255).astype(np.uint8)))
print(json.dumps({k: v.numpy().tolist() for k, v in out.items()} | {"uint8_probabilities": raw["probabilities"].numpy().tolist()}))
"""


def test_savedmodel_runs_in_a_fresh_process_without_capstf_and_matches_all_runtimes(exported, tmp_path):
    root, cfg, _ = exported
    images = digits()
    np.save(tmp_path / "images.npy", images)
    run = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(root / "out" / "capsnet" / "1"),
                          str(tmp_path / "images.npy")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    fresh = json.loads(run.stdout.strip().splitlines()[-1])
    model, _ = restore_for_inference(root / "model", cfg)
    memory = model(tf.constant(images))
    np.testing.assert_allclose(fresh["probabilities"], memory["probabilities"], atol=1e-5)
    np.testing.assert_allclose(fresh["uint8_probabilities"], memory["probabilities"], atol=1e-5)
    np.testing.assert_allclose(fresh["reconstructions"], memory["reconstructions"], atol=1e-5)
    import onnxruntime
    session = onnxruntime.InferenceSession(str(root / "out" / "capsnet.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    onnx_out = dict(zip(names, session.run(None, {session.get_inputs()[0].name: images})))
    np.testing.assert_allclose(onnx_out["probabilities"], memory["probabilities"], atol=1e-4)
    np.testing.assert_array_equal(onnx_out["classes"][:, 0], np.argmax(memory["probabilities"], -1))


def test_client_predicts_real_digits_through_grpc(server, tmp_path):
    from PIL import Image
    images = digits(4)
    np.save(tmp_path / "four.npy", images)
    Image.fromarray(np.round(images[0, ..., 0] * 255).astype(np.uint8)).save(tmp_path / "one.png")
    result = CliRunner().invoke(main, ["predict", "--server", server, str(tmp_path / "four.npy"), str(tmp_path / "one.png")])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.output.strip().splitlines()]
    assert len(lines) == 5 and lines[0]["classes"] == lines[4]["classes"]
    assert all(len(line["probabilities"]) == 10 for line in lines)


def test_metadata_lists_both_signatures(server):
    meta = client.metadata_grpc(server, "capsnet")
    assert meta["version"] == 1
    assert meta["signatures"]["serving_default"]["inputs"]["images"] == {"dtype": "float32", "shape": [-1, 28, 28, 1]}
    assert meta["signatures"]["predict_uint8"]["inputs"]["images"]["dtype"] == "uint8"
    assert set(meta["signatures"]["serving_default"]["outputs"]) == {"probabilities", "classes", "capsules", "reconstructions"}


def raw_predict(server, array, name="capsnet", signature="serving_default", input_name="images",
                version=None, output_filter=()):
    request = predict_pb2.PredictRequest()
    request.model_spec.name, request.model_spec.signature_name = name, signature
    if version is not None:
        request.model_spec.version.value = version
    request.output_filter.extend(output_filter)
    request.inputs[input_name].CopyFrom(tf.make_tensor_proto(array))
    with grpc.insecure_channel(server) as channel:
        return prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=30)


GOOD = digits(2)


@pytest.mark.parametrize("kwargs, code", [
    ({"name": "unknown"}, grpc.StatusCode.NOT_FOUND),
    ({"signature": "nope"}, grpc.StatusCode.INVALID_ARGUMENT),
    ({"input_name": "pixels"}, grpc.StatusCode.INVALID_ARGUMENT),
    ({"array": GOOD.astype(np.float64)}, grpc.StatusCode.INVALID_ARGUMENT),
    ({"array": GOOD[:, :20]}, grpc.StatusCode.INVALID_ARGUMENT),
    ({"array": GOOD[:0]}, grpc.StatusCode.INVALID_ARGUMENT),
    ({"array": np.zeros([1025, 28, 28, 1], np.float32)}, grpc.StatusCode.INVALID_ARGUMENT),
    ({"array": np.where(GOOD > 0.5, np.nan, GOOD).astype(np.float32)}, grpc.StatusCode.INVALID_ARGUMENT),
    ({"array": GOOD * 255}, grpc.StatusCode.INVALID_ARGUMENT),
    ({"version": 99}, grpc.StatusCode.NOT_FOUND),
    ({"output_filter": ["logits"]}, grpc.StatusCode.INVALID_ARGUMENT),
    ({"array": np.round(GOOD * 255).astype(np.uint8)}, grpc.StatusCode.INVALID_ARGUMENT),  # uint8 to the float signature
])
def test_bad_requests_are_rejected_and_the_server_keeps_serving(server, kwargs, code):
    array = kwargs.pop("array", GOOD)
    with pytest.raises(grpc.RpcError) as error:
        raw_predict(server, array, **kwargs)
    assert error.value.code() == code
    assert tf.make_ndarray(raw_predict(server, GOOD).outputs["probabilities"]).shape == (2, 10)  # still answers


def amplified_request(values=1, shape=(1024, 28, 28, 1)):
    """A PredictRequest declaring `shape` but carrying `values` floats (TensorFlow would repeat the last)."""
    request = predict_pb2.PredictRequest()
    request.model_spec.name, request.model_spec.signature_name = "capsnet", "serving_default"
    proto = request.inputs["images"]
    proto.dtype = tf.float32.as_datatype_enum
    proto.tensor_shape.dim.extend([tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in shape])
    proto.float_val.extend([0.5] * values)
    return request


def test_32_clients_at_once_are_all_answered_beside_oversized_and_amplified_requests(server, exported):
    import concurrent.futures
    expected = tf.make_ndarray(raw_predict(server, GOOD).outputs["probabilities"])
    oversized = np.zeros([6000, 28, 28, 1], np.float32)  # 18.8 MB, over the 16 MiB cap; 6,000 images too

    def send(kind):
        try:
            if kind == "good":
                return kind, tf.make_ndarray(raw_predict(server, GOOD).outputs["probabilities"])
            if kind == "oversized":
                raw_predict(server, oversized)
            else:
                with grpc.insecure_channel(server) as channel:
                    prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(amplified_request(), timeout=60)
            return kind, "answered"
        except grpc.RpcError as e:
            return kind, e.code()
    kinds = ["good"] * 32 * 3 + ["oversized"] * 4 + ["amplified"] * 4
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(send, kinds))
    good = [a for kind, a in answers if kind == "good"]
    assert len(good) == 96 and all(isinstance(a, np.ndarray) for a in good), [a for a in good if not isinstance(a, np.ndarray)][:3]
    for answer in good:
        np.testing.assert_allclose(answer, expected, atol=1e-6)
    assert {a for kind, a in answers if kind == "oversized"} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert {a for kind, a in answers if kind == "amplified"} == {grpc.StatusCode.INVALID_ARGUMENT}


def test_a_request_must_carry_every_value_of_its_shape(server):
    with grpc.insecure_channel(server) as channel, pytest.raises(grpc.RpcError) as error:
        prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(amplified_request(1, (2, 28, 28, 1)), timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "holds 1: send every value" in error.value.details()
    with grpc.insecure_channel(server) as channel:  # the same values in the typed list, every one of them: fine
        answer = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(
            amplified_request(2 * 28 * 28, (2, 28, 28, 1)), timeout=30)
    assert tf.make_ndarray(answer.outputs["probabilities"]).shape == (2, 10)


def test_requests_beyond_the_concurrency_limit_get_resource_exhausted(exported):
    import concurrent.futures
    root, _, _ = exported
    grpc_server, port, _ = start_server(root / "out", port=0, workers=1, limits=Limits(max_concurrent_rpcs=2))
    batch = np.repeat(GOOD, 128, axis=0)  # 256 images: long enough that the requests overlap
    try:
        def send(_):
            try:
                raw_predict(f"127.0.0.1:{port}", batch)
                return "answered"
            except grpc.RpcError as e:
                return e.code()
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            codes = list(pool.map(send, range(12)))
        assert set(codes) == {"answered", grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
        assert raw_predict(f"127.0.0.1:{port}", GOOD).outputs["probabilities"]  # and it serves on
    finally:
        grpc_server.stop(0)


def self_signed_certificate(folder):
    """(certificate, key) PEM files for 127.0.0.1 and localhost, made here."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                               x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
                   .sign(key, hashes.SHA256()))
    (folder / "cert.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    return folder / "cert.pem", folder / "key.pem"


def test_tls_serves_the_same_answers_and_only_over_tls(exported, tmp_path):
    root, _, _ = exported
    cert, key = self_signed_certificate(tmp_path)
    grpc_server, port, _ = start_server(root / "out", port=0, tls_cert=cert, tls_key=key)
    try:
        address = f"127.0.0.1:{port}"
        over_tls = client.predict_grpc(address, "capsnet", "serving_default", GOOD, timeout=30, tls_ca=cert)
        with pytest.raises(CapstfError, match="Cannot reach a TF Serving gRPC server"):  # in the clear: refused
            client.predict_grpc(address, "capsnet", "serving_default", GOOD, timeout=5)
        np.save(tmp_path / "two.npy", GOOD)
        result = CliRunner().invoke(main, ["predict", "--server", address, "--tls-ca", str(cert), str(tmp_path / "two.npy")])
        assert result.exit_code == 0, result.output
        assert [json.loads(line)["classes"] for line in result.output.strip().splitlines()] == over_tls["classes"].tolist()
    finally:
        grpc_server.stop(0)


def test_tls_needs_both_files_and_says_so():
    result = CliRunner().invoke(main, ["serve", "--export-dir", ".", "--tls-cert", "cert.pem"])
    assert result.exit_code == 2 and result.output.strip().endswith("TLS needs both --tls-cert and --tls-key.")


def test_a_version_exported_while_serving_is_picked_up_and_no_request_fails(exported, tmp_path):
    import threading
    import time
    root, _, _ = exported
    shutil.copytree(root / "out" / "capsnet" / "1", tmp_path / "out" / "capsnet" / "1")
    loaded = []
    grpc_server, port, _ = start_server(tmp_path / "out", port=0, poll_seconds=0.2, log=loaded.append)
    answers, stop = [], threading.Event()  # (version, probabilities) or a status code, from 4 clients

    def ask():
        while not stop.is_set():
            try:
                response = raw_predict(f"127.0.0.1:{port}", GOOD)
                answers.append((response.model_spec.version.value, tf.make_ndarray(response.outputs["probabilities"])))
            except grpc.RpcError as e:
                answers.append(e.code())
    clients = [threading.Thread(target=ask) for _ in range(4)]
    try:
        [c.start() for c in clients]
        export(root / "model", tmp_path / "out", formats=("savedmodel",))  # version 2, while they ask
        deadline = time.time() + 120
        while time.time() < deadline and not any(isinstance(a, tuple) and a[0] == 2 for a in answers[-4:]):
            time.sleep(0.1)
        time.sleep(0.5)
    finally:
        stop.set()
        [c.join() for c in clients]
        grpc_server.stop(0)
    failed = [a for a in answers if not isinstance(a, tuple)]
    assert not failed and {version for version, _ in answers} == {1, 2}, failed[:3]
    expected = answers[0][1]  # both versions are the same checkpoint: the same answer
    assert all(np.allclose(probabilities, expected, atol=1e-6) for _, probabilities in answers)
    assert loaded == ["serving capsnet version 2 (2 warm-up requests replayed)"]


def test_capstf_serve_says_where_it_listens_then_each_version_as_the_watcher_does(exported, server):
    root, _, _ = exported
    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    serve = subprocess.Popen([sys.executable, "-m", "capstf.cli", "serve", "--export-dir", str(root / "served"),
                              "--port", str(ports[0]), "--rest-port", str(ports[1])],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = [serve.stdout.readline().strip() for _ in range(2)]
    finally:
        serve.kill()
        serve.wait()
    assert lines == [f"capstf: listening: gRPC on 127.0.0.1:{ports[0]}, REST on 127.0.0.1:{ports[1]}, in the clear, "
                     "unauthenticated", "serving capsnet version 1 (2 warm-up requests replayed)"]


@pytest.fixture(scope="module")
def rest_server(exported):
    root, _, _ = exported
    server, port, _ = start_server(root / "out", port=0, rest_port=0, poll_seconds=0)
    yield f"127.0.0.1:{port}", f"127.0.0.1:{server.rest_port}"
    server.stop(0)


def http(address, path, body=None):
    """(HTTP status, decoded JSON body) of a GET, or of a POST of `body` (bytes or JSON-able)."""
    import urllib.error
    import urllib.request
    data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(f"http://{address}{path}", data), timeout=60) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def test_rest_answers_equal_grpc_in_both_formats_and_both_signatures(rest_server, tmp_path):
    grpc_address, rest = rest_server
    answer = raw_predict(grpc_address, GOOD)
    from_grpc = {k: tf.make_ndarray(v) for k, v in answer.outputs.items()}
    status, columnar = http(rest, "/v1/models/capsnet:predict", {"inputs": {"images": GOOD.tolist()}})
    assert status == 200 and set(columnar["outputs"]) == set(from_grpc)
    status, rows = http(rest, f"/v1/models/capsnet/versions/{answer.model_spec.version.value}:predict",
                        {"instances": GOOD.tolist()})
    assert status == 200 and len(rows["predictions"]) == 2
    status, uint8_rows = http(rest, "/v1/models/capsnet:predict", {
        "signature_name": "predict_uint8", "instances": [{"images": np.round(image * 255).astype(int).tolist()} for image in GOOD]})
    assert status == 200
    for key, expected in from_grpc.items():
        np.testing.assert_allclose(np.asarray(columnar["outputs"][key]), expected, atol=1e-6)
        for answers in (rows, uint8_rows):
            np.testing.assert_allclose(np.asarray([p[key] for p in answers["predictions"]]), expected, atol=1e-6)
    np.save(tmp_path / "two.npy", GOOD)
    outputs = [CliRunner().invoke(main, ["predict", "--server", address, *flag, str(tmp_path / "two.npy")]).output
               for address, flag in ((rest, ["--rest"]), (grpc_address, []))]
    assert outputs[0] == outputs[1] and outputs[0].count("\n") == 2  # capstf predict --rest: the gRPC answers


def test_rest_status_and_metadata_are_tf_servings(rest_server):
    grpc_address, rest = rest_server
    version = str(raw_predict(grpc_address, GOOD).model_spec.version.value)
    assert http(rest, "/v1/models/capsnet") == (200, {"model_version_status": [
        {"version": version, "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]})
    status, metadata = http(rest, f"/v1/models/capsnet/versions/{version}/metadata")
    signatures = metadata["metadata"]["signature_def"]["signature_def"]
    assert status == 200 and metadata["model_spec"] == {"name": "capsnet", "signature_name": "", "version": version}
    assert signatures["serving_default"]["inputs"]["images"]["dtype"] == "DT_FLOAT"
    assert signatures["predict_uint8"]["inputs"]["images"]["dtype"] == "DT_UINT8"


@pytest.mark.parametrize("path, body, status, message", [
    ("/v1/models/nope", None, 404, "Servable not found"),
    ("/v1/models/capsnet/versions/7", None, 404, "version 7 not found"),
    ("/v2/anything", None, 404, "Malformed request"),
    ("/v1/models/capsnet:predict", b"{not json", 400, "not JSON"),
    ("/v1/models/capsnet:predict", {"instances": [[1, 2]]}, 400, "must have shape"),
    ("/v1/models/capsnet:predict", {"inputs": GOOD.tolist(), "instances": GOOD.tolist()}, 400, "exactly one"),
    ("/v1/models/capsnet:predict", {"inputs": {"pixels": GOOD.tolist()}}, 400, "takes exactly one input"),
    ("/v1/models/capsnet:predict", {"instances": (GOOD * 255).tolist()}, 400, "images must be in [0, 1]"),
    ("/v1/models/capsnet:predict", {"signature_name": "predict_uint8", "instances": GOOD.tolist()}, 400, "whole numbers"),
])
def test_bad_rest_requests_get_tf_servings_error_bodies(rest_server, path, body, status, message):
    _, rest = rest_server
    answer = http(rest, path, body)
    assert answer[0] == status and message in answer[1]["error"], answer
    assert http(rest, "/v1/models/capsnet")[0] == 200  # and it serves on


def test_a_rest_body_over_the_message_limit_is_413_with_an_error_body(exported):
    root, _, _ = exported
    server, _, _ = start_server(root / "out", port=0, rest_port=0, poll_seconds=0, limits=Limits(max_message_bytes=100_000))
    try:
        status, body = http(f"127.0.0.1:{server.rest_port}", "/v1/models/capsnet:predict",
                            {"instances": np.zeros([32, 28, 28, 1]).tolist()})  # 177 KB of JSON
        assert status == 413 and "at most 100000" in body["error"]
    finally:
        server.stop(0)


def test_unreachable_server_is_a_clear_error():
    result = CliRunner().invoke(main, ["predict", "--server", "127.0.0.1:1", "--timeout", "2", "x.npy"])
    assert result.exit_code == 2 and "no such file" in result.output
    with pytest.raises(CapstfError, match="Cannot reach a TF Serving gRPC server"):
        client.predict_grpc("127.0.0.1:1", "capsnet", "serving_default", GOOD, timeout=2)


def test_served_predictions_equal_the_trained_models(server, exported):
    root, cfg, _ = exported
    model, _ = restore_for_inference(root / "model", cfg)
    expected = model(GOOD)["probabilities"].numpy()
    for served in (client.predict_grpc(server, "capsnet", "serving_default", GOOD, timeout=30),
                   client.predict_grpc(server, "capsnet", "predict_uint8", np.round(GOOD * 255).astype(np.uint8), timeout=30)):
        np.testing.assert_allclose(served["probabilities"], expected, atol=1e-5)
        np.testing.assert_array_equal(served["classes"][:, 0], np.argmax(expected, -1))


def test_output_filter_returns_only_the_named_outputs(server):
    response = raw_predict(server, GOOD, output_filter=["classes"])
    assert set(response.outputs) == {"classes"}


def test_metadata_with_an_unsupported_field_is_invalid_argument(server):
    from tensorflow_serving.apis import get_model_metadata_pb2
    request = get_model_metadata_pb2.GetModelMetadataRequest()
    request.model_spec.name = "capsnet"
    request.metadata_field.append("everything")
    with grpc.insecure_channel(server) as channel, pytest.raises(grpc.RpcError) as error:
        prediction_service_pb2_grpc.PredictionServiceStub(channel).GetModelMetadata(request, timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_truncated_npy_file_is_a_clear_error(tmp_path):
    np.save(tmp_path / "digits.npy", digits(4))
    data = (tmp_path / "digits.npy").read_bytes()
    (tmp_path / "digits.npy").write_bytes(data[:len(data) // 2])
    result = CliRunner().invoke(main, ["predict", "--server", "127.0.0.1:1", str(tmp_path / "digits.npy")])
    assert result.exit_code == 2 and "digits.npy: not a readable .npy array" in result.output
    assert "Traceback" not in result.output


def test_an_npy_file_of_text_is_a_clear_error(tmp_path):
    np.save(tmp_path / "labels.npy", np.array([["7", "2"], ["1", "0"]]))
    result = CliRunner().invoke(main, ["predict", "--server", "127.0.0.1:1", str(tmp_path / "labels.npy")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "labels.npy: expected pixel values (integers or floats), got dtype <U1" in result.output


@pytest.mark.parametrize("damaged", ["saved_model.pb", "variables/variables.data-00000-of-00001"])
def test_a_damaged_export_is_a_clear_error_when_serving_starts(exported, tmp_path, damaged):
    root, _, _ = exported
    shutil.copytree(root / "out" / "capsnet" / "1", tmp_path / "capsnet" / "1")
    path = tmp_path / "capsnet" / "1" / damaged
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])  # a copy cut short
    expected = re.escape(f"{tmp_path / 'capsnet' / '1'} is not a readable SavedModel (")
    with pytest.raises(CapstfError, match="^" + expected):
        load_servables(tmp_path)  # what `capstf serve` starts with: its CapstfError is the CLI's one line
