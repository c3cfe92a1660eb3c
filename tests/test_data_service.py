"""Training examples generated on tf.data service workers: a dispatcher and two workers in this
process, on 127.0.0.1."""
import socket

import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner
from conftest import small_config

from capstf.cli import main
from capstf.data.datasets import make_dataset
from capstf.data.service import generated_by_service, start_dispatcher, start_worker
from capstf.train import train


@pytest.fixture(scope="module")
def service():
    """grpc://localhost:PORT of a dispatcher with two workers."""
    dispatcher = start_dispatcher(0)
    workers = [start_worker(dispatcher.target.removeprefix("grpc://"), 0, "localhost:%port%") for _ in range(2)]
    yield dispatcher.target
    for server in workers + [dispatcher]:
        server.stop()


def test_each_example_is_generated_once_over_two_workers(service, train_digits):
    cfg = small_config().data
    batch, batches = 16, 40  # 640 examples, well inside the first epoch (5,000 digits, each once)
    # Every example of the first epoch, found by its pixels and label (each is one digit, shifted).
    first_epoch = next(iter(make_dataset(cfg, train_digits, "train", len(train_digits.labels), seed=0)))
    position = {(image.tobytes(), int(label)): i
                for i, (image, label) in enumerate(zip(first_epoch["image"].numpy(), first_epoch["label"].numpy()))}
    assert len(position) == len(train_digits.labels)

    served = generated_by_service(make_dataset(cfg, train_digits, "train", batch, seed=0), service)
    positions = [position[(image.tobytes(), int(label))] for b in served.take(batches)
                 for image, label in zip(b["image"].numpy(), b["label"].numpy())]
    # Handed out one position at a time, none twice (each worker generating the whole stream, as
    # without sharding, would repeat every example); the few not yet served are still in the workers'
    # buffers, so what came is nearly the start of the stream.
    assert len(positions) == len(set(positions)) == batch * batches
    assert max(positions) < 2 * batch * batches


def test_training_through_the_service_sees_as_many_examples_as_without(service, tmp_path, monkeypatch):
    served = []  # a mark per batch the trainer took from the service

    def counted(dataset, address):
        def mark(batch):
            with tf.control_dependencies([tf.py_function(lambda: served.append(1) or 0, [], tf.int32)]):
                return {k: tf.identity(v) for k, v in batch.items()}
        return generated_by_service(dataset, address).map(mark)
    monkeypatch.setattr("capstf.train.generated_by_service", counted)
    here = train(small_config(steps=6, log_every=6), tmp_path / "here", quiet=True)
    assert not served
    there = train(small_config(steps=6, log_every=6, data_service=service), tmp_path / "there", quiet=True)
    assert (there["step"], there["examples_seen"]) == (here["step"], here["examples_seen"]) == (6, 6 * 32)
    assert np.isfinite(there["loss"]) and len(served) >= 6  # and a few more, prefetched


def test_an_unreachable_dispatcher_fails_at_once_and_leaves_nothing(tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = CliRunner().invoke(main, ["train", "--dataset", "mnist", "--data-dir", "sample", "--runlocal",
                                       "--data-service", f"grpc://127.0.0.1:{port}",
                                       "--model-dir", str(tmp_path / "run")])
    assert result.exit_code == 1 and f"grpc://127.0.0.1:{port} did not answer" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "run").exists()


def test_a_port_in_use_is_one_line(service):
    port = service.rsplit(":", 1)[1]
    result = CliRunner().invoke(main, ["data-service", "dispatcher", "--port", port])
    assert result.exit_code == 2 and f"Cannot start the tf.data service dispatcher on port {port}" in result.output
