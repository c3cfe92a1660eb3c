"""capstf.parallel: which GPU each of `capstf study --jobs N`'s processes gets (faked GPUs)."""
import pytest
import tensorflow as tf

from capstf.parallel import last_error, least_used_gpu, visible_gpus, worker_environment


@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: ["gpu a", "gpu b"] if kind == "GPU" else [])


def test_workers_are_spread_over_the_gpus_each_getting_the_least_used():
    gpus = ["0", "1"]
    assert least_used_gpu(gpus, []) == "0"
    assert least_used_gpu(gpus, ["0"]) == "1"
    assert least_used_gpu(gpus, ["0", "1"]) == "0"  # several share a GPU once each has one
    assert least_used_gpu(gpus, ["1", "1", "0"]) == "0"  # a worker that ended freed GPU 0's place
    assert least_used_gpu([], ["x"]) is None  # no GPU: nothing to pick


def test_the_gpus_keep_the_ids_the_users_cuda_visible_devices_gave_them(two_gpus, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert visible_gpus() == ["0", "1"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert visible_gpus() == ["2", "3"]  # not "0": in a worker, that is the machine's GPU 0, left out


def test_a_worker_sees_only_its_gpu_and_takes_its_memory_as_needed(monkeypatch):
    monkeypatch.delenv("TF_FORCE_GPU_ALLOW_GROWTH", raising=False)
    env = worker_environment("3")
    assert env["CUDA_VISIBLE_DEVICES"] == "3" and env["TF_FORCE_GPU_ALLOW_GROWTH"] == "true"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the user's "no GPU" stands where there is none to give
    assert worker_environment(None)["CUDA_VISIBLE_DEVICES"] == ""
    monkeypatch.setenv("TF_FORCE_GPU_ALLOW_GROWTH", "false")  # the user's own choice stands
    assert worker_environment("0")["TF_FORCE_GPU_ALLOW_GROWTH"] == "false"


def test_a_failed_worker_is_explained_by_its_error_line(tmp_path):
    log = tmp_path / "run.log"
    log.write_text("capstf: training mnist\ncapstf: error: --model-dir x exists and is not a folder.\n")
    assert last_error(log) == "--model-dir x exists and is not a folder."
    log.write_text("Traceback (most recent call last):\n  ...\nMemoryError\n\n")
    assert last_error(log) == "MemoryError"  # no error line: the last line it wrote
    assert last_error(tmp_path / "never-written.log") == "no output"
