"""Shared fixtures: the bundled real digits and a small model configuration."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import pytest  # noqa: E402

from capstf.train import split_cpu  # noqa: E402

split_cpu(2)  # two logical CPU devices, for the MirroredStrategy tests; must precede any TF op


@pytest.fixture(scope="session")
def train_digits():
    from capstf.data.sources import load_examples
    return load_examples("sample", "train")


@pytest.fixture(scope="session")
def test_digits():
    from capstf.data.sources import load_examples
    return load_examples("sample", "test")


def small_config(dataset="mnist", **train):
    """The mnist/multimnist recipe with a small CapsNet, float32, for fast tests."""
    from capstf import config
    overrides = {"data.dataset": dataset, "data.data_dir": "sample", "data.partners_per_digit": 1,
                 "model.conv1_filters": 32, "model.primary_caps_types": 8,
                 "train.precision": "float32", "train.batch_size": 32, "train.log_every": 5,
                 "train.distribute": "one-device"}
    overrides.update({f"train.{k}": v for k, v in train.items()})
    return config.resolve(dataset, overrides)


@pytest.fixture(scope="session")
def trained_mnist(tmp_path_factory):
    """A small CapsNet trained for 30 steps on the sample digits: (model dir, config)."""
    from capstf.train import train
    model_dir = tmp_path_factory.mktemp("trained") / "mnist"
    cfg = small_config(steps=30, learning_rate=3e-3, checkpoint_every=30)
    train(cfg, model_dir, quiet=True)
    return model_dir, cfg
