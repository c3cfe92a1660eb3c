"""Shared fixtures: the bundled real digits and a small model configuration."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import pytest  # noqa: E402

from capstf.train import split_cpu  # noqa: E402

split_cpu(2)  # two logical CPU devices, for the MirroredStrategy tests; must precede any TF op


@pytest.fixture(scope="session")
def train_digits():
    from capstf.data.sources import load_digits
    return load_digits("sample", "train")


@pytest.fixture(scope="session")
def test_digits():
    from capstf.data.sources import load_digits
    return load_digits("sample", "test")


def small_config(dataset="mnist", **train):
    """The mnist/multimnist recipe with a small CapsNet, float32, for fast tests."""
    from capstf import config
    overrides = {"data.dataset": dataset, "data.data_dir": "sample", "data.partners_per_digit": 1,
                 "model.conv1_filters": 32, "model.primary_caps_types": 8, "model.digit_caps_dim": 8,
                 "train.precision": "float32", "train.batch_size": 32, "train.log_every": 5,
                 "train.distribute": "one-device"}
    overrides.update({f"train.{k}": v for k, v in train.items()})
    return config.resolve(dataset, overrides)
