"""Shared fixtures: the bundled real digits and a small model configuration."""
import os
from pathlib import Path

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


def small_config(dataset="mnist", settings=None, **train):
    """The mnist/multimnist recipe with a small CapsNet, float32, for fast tests; `settings`
    ({"model.decoder": False, ...}) and train.* keywords override it."""
    from capstf import config
    overrides = {"data.dataset": dataset, "data.data_dir": "sample", "data.partners_per_digit": 1,
                 "model.conv1_filters": 32, "model.primary_caps_types": 8,
                 "train.precision": "float32", "train.batch_size": 32, "train.log_every": 5,
                 "train.distribute": "one-device"}
    overrides.update({f"train.{k}": v for k, v in train.items()}, **(settings or {}))
    return config.resolve(dataset, overrides)


def model_from_checkpoint_files(model_dir, step=None):
    """The float32 model of model_dir's ckpt-STEP (default: the highest step on disk), read
    straight from config.json and the checkpoint's files: an expected value that does not go
    through capstf.checkpoints (which picks, falls back and checks what it restores)."""
    import tensorflow as tf

    from capstf import config
    from capstf.model import build_model
    folder = Path(model_dir) / "checkpoints"
    step = step or max(int(p.name[len("ckpt-"):-len(".index")]) for p in folder.glob("ckpt-*.index"))
    model = build_model(config.load_saved(model_dir).model, jit_routing=False)
    tf.train.Checkpoint(model=model).read(str(folder / f"ckpt-{step}")).assert_existing_objects_matched().expect_partial()
    return model


def differences_in_exported_files(export_dir, images, expected_probabilities, name="capsnet", version=1):
    """{format: max |probabilities - expected|} over `images`, recomputed from the SavedModel and
    ONNX files an export wrote (those present): what its report claims, checked independently."""
    import numpy as np
    import onnxruntime
    import tensorflow as tf
    export_dir, found = Path(export_dir), {}
    if (export_dir / name / str(version)).is_dir():
        served = tf.saved_model.load(str(export_dir / name / str(version))).signatures["serving_default"]
        found["savedmodel"] = served(images=tf.constant(images))["probabilities"].numpy()
    if (export_dir / f"{name}.onnx").is_file():
        session = onnxruntime.InferenceSession(str(export_dir / f"{name}.onnx"), providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        found["onnx"] = dict(zip(names, session.run(None, {session.get_inputs()[0].name: images})))["probabilities"]
    return {fmt: float(np.max(np.abs(got.astype(np.float64) - expected_probabilities))) for fmt, got in found.items()}


@pytest.fixture(scope="session")
def trained_mnist(tmp_path_factory):
    """A small CapsNet trained for 30 steps on the sample digits: (model dir, config)."""
    from capstf.train import train
    model_dir = tmp_path_factory.mktemp("trained") / "mnist"
    cfg = small_config(steps=30, learning_rate=3e-3, checkpoint_every=30)
    train(cfg, model_dir, quiet=True)
    return model_dir, cfg
