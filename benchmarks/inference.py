"""Inference speed of an exported model, as JSON: batch-1 p50/p99 latency and batch-128
throughput for the SavedModel, ONNX Runtime, and a gRPC round trip to `capstf serve`; `capstf
serve` under `--clients` concurrent clients (requests, failures, p50/p99); and the first
request's latency after `capstf serve` starts, with and without the export's warm-up requests
(each in a fresh process, `--first-requests` times, median).

    python benchmarks/inference.py --model-dir runs/mnist [--export-dir /tmp/capstf-bench] [--clients 32]

Exports the model first if --export-dir holds no export yet. Uses real test digits.
"""
import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from capstf import config as config_lib  # noqa: E402
from capstf.data.datasets import make_dataset  # noqa: E402
from capstf.data.sources import load_examples  # noqa: E402
from capstf.errors import CapstfError  # noqa: E402
from capstf.export import export  # noqa: E402
from capstf.serving.client import predict_grpc  # noqa: E402
from capstf.serving.server import start_server  # noqa: E402


def latency(fn, batch, calls):
    fn(batch[:1])
    times = []
    for i in range(calls):
        start = time.perf_counter()
        fn(batch[i % len(batch):i % len(batch) + 1])
        times.append(time.perf_counter() - start)
    return {"p50_ms": round(1000 * float(np.percentile(times, 50)), 2),
            "p99_ms": round(1000 * float(np.percentile(times, 99)), 2)}


def throughput(fn, batch, calls):
    fn(batch)
    start = time.perf_counter()
    for _ in range(calls):
        fn(batch)
    return round(len(batch) * calls / (time.perf_counter() - start), 1)


def concurrent_clients(fn, images, clients, requests_each):
    """`clients` threads at once, each sending `requests_each` batch-1 requests through `fn`."""
    from concurrent.futures import ThreadPoolExecutor

    def client(c):
        times, failures = [], 0
        for i in range(requests_each):
            start = time.perf_counter()
            try:
                fn(images[(c + i) % len(images)][None])
                times.append(time.perf_counter() - start)
            except CapstfError:  # the client's one-line errors: refused, timed out, unreachable
                failures += 1
        return times, failures
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        answers = list(pool.map(client, range(clients)))
    wall = time.perf_counter() - start
    times = [t for ts, _ in answers for t in ts]
    return {"clients": clients, "requests": clients * requests_each, "failures": sum(f for _, f in answers),
            "p50_ms": round(1000 * float(np.percentile(times, 50)), 2),
            "p99_ms": round(1000 * float(np.percentile(times, 99)), 2),
            "requests_per_s": round(len(times) / wall, 1)}


FIRST_REQUEST = """
import shutil, sys, time, numpy as np
from pathlib import Path
from capstf.serving.client import predict_grpc
from capstf.serving.server import start_server
out, warm = Path(sys.argv[1]), sys.argv[2] == "warm"
if not warm:
    shutil.rmtree(next(out.glob("capsnet/*/assets.extra")))
server, port, _ = start_server(out, port=0)
image = np.load(sys.argv[3])
start = time.perf_counter()
predict_grpc(f"127.0.0.1:{port}", "capsnet", "serving_default", image, timeout=120)
print(1000 * (time.perf_counter() - start))
"""


def first_request_ms(out, image, warm, tries):
    """Median over fresh processes of the first gRPC request's latency once serving has started."""
    import shutil
    import subprocess
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        np.save(Path(tmp) / "image.npy", image)
        version = max((p for p in (out / "capsnet").iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
        for _ in range(tries):
            copy = Path(tmp) / "export"
            shutil.rmtree(copy, ignore_errors=True)
            shutil.copytree(version, copy / "capsnet" / "1")
            run = subprocess.run([sys.executable, "-c", FIRST_REQUEST, str(copy), "warm" if warm else "cold",
                                  str(Path(tmp) / "image.npy")], capture_output=True, text=True, check=True)
            times.append(float(run.stdout.strip().splitlines()[-1]))
    return round(float(np.median(times)), 1)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--export-dir", default=os.path.join(tempfile.gettempdir(), "capstf-bench"))
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--batch-calls", type=int, default=5)
    parser.add_argument("--first-requests", type=int, default=3, help="Fresh servers per first-request figure.")
    parser.add_argument("--clients", type=int, default=32, help="Concurrent clients of capstf serve.")
    parser.add_argument("--requests-per-client", type=int, default=20)
    args = parser.parse_args()
    out = Path(args.export_dir)
    if not (out / "capsnet.onnx").is_file():
        export(args.model_dir, out)
    cfg = config_lib.load_saved(args.model_dir)
    digits = load_examples(cfg.data.data_dir, "test")
    images = next(iter(make_dataset(cfg.data, digits, "test", 128, 0, limit=128)))["image"].numpy()

    versions = sorted(int(p.name) for p in (out / "capsnet").iterdir() if p.name.isdigit())
    signature = tf.saved_model.load(str(out / "capsnet" / str(versions[-1]))).signatures["serving_default"]
    savedmodel = lambda x: signature(images=tf.constant(x))["probabilities"].numpy()
    import onnxruntime
    session = onnxruntime.InferenceSession(str(out / "capsnet.onnx"), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    onnx = lambda x: session.run(["probabilities"], {input_name: x})
    server, port, _ = start_server(out, port=0)
    grpc_call = lambda x: predict_grpc(f"127.0.0.1:{port}", "capsnet", "serving_default", x, timeout=60)
    results = {"model_dir": args.model_dir, "input": list(images.shape[1:])}
    try:
        for name, fn in [("savedmodel", savedmodel), ("onnxruntime", onnx), ("grpc_capstf_serve", grpc_call)]:
            results[name] = {"batch1": latency(fn, images, args.calls),
                             "batch128_images_per_s": throughput(fn, images, args.batch_calls)}
        results["grpc_capstf_serve_concurrent"] = concurrent_clients(grpc_call, images, args.clients,
                                                                     args.requests_per_client)
    finally:
        server.stop(0)
    results["first_request_ms"] = {kind: first_request_ms(out, images[:1], kind == "warmed_up", args.first_requests)
                                   for kind in ("warmed_up", "cold")}
    print(json.dumps(results))


if __name__ == "__main__":
    try:
        main()
    except CapstfError as e:
        sys.exit(f"error: {e}")
