import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner
from conftest import small_config

from capstf import config as config_lib
from capstf.cli import main
from capstf.errors import CapstfError
from capstf.evaluate import evaluate
from capstf.train import FusedAdam, build_state, restore_for_inference, train


def weights(model_dir, cfg):
    model, step = restore_for_inference(model_dir, cfg)
    return step, [v.numpy() for v in model.trainable_variables]


def test_short_run_learns_and_evaluates(tmp_path):
    cfg = small_config(steps=60, learning_rate=3e-3, checkpoint_every=30)
    first = train(cfg, tmp_path, quiet=True)
    assert first["step"] == 60 and first["accuracy"] > 0.5  # chance is 0.1
    metrics = evaluate(tmp_path, limit=500)
    assert metrics["examples"] == 500 and metrics["accuracy"] > 0.5
    assert json.loads((tmp_path / "eval_mnist_test.json").read_text())["accuracy"] == metrics["accuracy"]
    assert (tmp_path / "config.json").is_file() and list((tmp_path / "train").iterdir())


def test_mirrored_over_two_devices_trains_like_one_device(tmp_path):
    one = train(small_config(steps=4, log_every=1), tmp_path / "one", quiet=True)
    two = train(small_config(steps=4, log_every=1, distribute="mirrored"), tmp_path / "two", quiet=True)
    assert np.isclose(one["loss"], two["loss"], rtol=1e-3)
    _, w_one = weights(tmp_path / "one", small_config())
    _, w_two = weights(tmp_path / "two", small_config())
    for a, b in zip(w_one, w_two):
        np.testing.assert_allclose(a, b, atol=2e-5)


def test_interrupted_run_resumes_to_the_same_weights(tmp_path):
    train(small_config(steps=6, checkpoint_every=3), tmp_path / "straight", quiet=True)
    train(small_config(steps=3, checkpoint_every=3), tmp_path / "resumed", quiet=True)
    resumed = train(small_config(steps=6, checkpoint_every=3), tmp_path / "resumed", quiet=True)
    assert resumed["step"] == 6
    step_a, a = weights(tmp_path / "straight", small_config())
    step_b, b = weights(tmp_path / "resumed", small_config())
    assert step_a == step_b == 6
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, atol=1e-6)


def test_cosine_schedule_falls_from_the_learning_rate_to_zero_over_the_run():
    _, optimizer, _ = build_state(small_config(schedule="cosine", learning_rate=2e-3), "off", "float32", total_steps=10)
    rates = []
    for step in (0, 5, 10):
        optimizer.iterations.assign(step)
        rates.append(float(optimizer.learning_rate))
    np.testing.assert_allclose(rates, [2e-3, 1e-3, 0.0], atol=1e-9)


def test_fused_adam_updates_like_keras_adam():
    rng = np.random.default_rng(0)
    start = [rng.normal(size=s).astype("float32") for s in [(3, 4), (5,)]]
    grads = [[rng.normal(size=w.shape).astype("float32") for w in start] for _ in range(5)]
    results = []
    for optimizer in (tf.keras.optimizers.Adam(1e-2), FusedAdam(1e-2)):
        variables = [tf.Variable(w) for w in start]
        for g in grads:
            optimizer.apply_gradients(zip(g, variables))
        results.append([v.numpy() for v in variables])
    for keras_w, fused_w, w in zip(*results, start):
        assert np.abs(keras_w - w).max() > 1e-2  # five steps moved the weights
        np.testing.assert_allclose(fused_w, keras_w, rtol=1e-5, atol=1e-7)


def test_incompatible_model_dir_is_refused_and_other_changes_are_reported(tmp_path, capsys):
    train(small_config(steps=1), tmp_path, quiet=True)
    cfg = small_config(steps=2)
    cfg.model.routing_iters = 1
    with pytest.raises(CapstfError, match="routing_iters: 3 -> 1"):
        train(cfg, tmp_path, quiet=True)
    capsys.readouterr()
    train(small_config(steps=2, learning_rate=2e-3), tmp_path, quiet=True)
    assert "resumed from step 1; settings changed since: train.steps: 1 -> 2; train.learning_rate: 0.001 -> 0.002" \
        in capsys.readouterr().out


def test_multimnist_trains_and_scores_both_digits(tmp_path):
    result = train(small_config("multimnist", steps=3), tmp_path, quiet=True)
    assert np.isfinite(result["loss"]) and result["reconstruction_loss"] > 0
    metrics = evaluate(tmp_path, limit=64)
    assert metrics["both_correct_accuracy"] == metrics["accuracy"] and metrics["examples"] == 64


@pytest.mark.parametrize("args, message", [
    (["train", "--dataset", "mnist", "--data-dir", "/no/such/dir", "--steps", "1"], "does not exist"),
    (["train", "--dataset", "mnist", "--data-dir", "sample", "--batch-size", "0"], "batch_size must be at least 1"),
    (["train", "--dataset", "mnist", "--set", "train.nonsense=3"], "Unknown setting"),
    (["train", "--dataset", "mnist", "--set", "train.steps=many"], "expected a int"),
    (["train", "--dataset", "mnist", "--recipe", "nope"], "No recipe 'nope'"),
    (["train", "--dataset", "multimnist", "--set", "data.train_max_rotation_deg=10"], "for --dataset mnist and expanded-mnist only"),
    (["evaluate", "--model-dir", "/no/such/model"], "no trained model"),
])
def test_bad_input_gives_a_clear_error(args, message, tmp_path):
    if args[0] == "train":
        args = args + ["--model-dir", str(tmp_path / "run")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()  # a failed start leaves nothing behind


def test_unknown_dataset_is_a_usage_error():
    result = CliRunner().invoke(main, ["train", "--dataset", "cifar"])
    assert result.exit_code == 2 and "Invalid value for '--dataset'" in result.output


def test_recipes_are_found_and_runlocal_shrinks_them():
    assert {"mnist", "multimnist", "expanded-mnist"} <= set(config_lib.recipe_names())
    full, local = config_lib.resolve("multimnist"), config_lib.resolve("multimnist", runlocal=True)
    assert full.model.input_size == 36 and full.train.decay_steps == 10 * config_lib.resolve("mnist").train.decay_steps
    assert local.train.steps and local.data.dataset == full.data.dataset
    assert local.model.input_size == 36 and local.model.conv1_filters < full.model.conv1_filters


def test_a_recipe_with_a_base_changes_only_what_it_lists():
    base, derived = config_lib.resolve("mnist-small"), config_lib.resolve("mnist-small-rotate-scale")
    assert base.data.train_max_rotation_deg == 0 < derived.data.train_max_rotation_deg
    assert derived.train.epochs == 2 * base.train.epochs and derived.recipe == "mnist-small-rotate-scale"
    derived.data.train_max_rotation_deg = derived.data.train_max_scale_change = 0.0
    derived.train.epochs, derived.recipe = base.train.epochs, base.recipe
    assert derived == base
    assert config_lib.resolve("mnist-small-rotate-scale", runlocal=True).train.steps == 20  # base's [runlocal]
    grandchild = config_lib.resolve("mnist-small-rotate-scale-then-shift")  # a base's base applies too
    assert grandchild.data.train_max_rotation_deg == 15 and grandchild.model == base.model
    assert 0 < grandchild.data.train_rotate_scale_epochs < grandchild.train.epochs


@pytest.mark.parametrize("text, message", [
    ('base = "mnist"\nepochs = 3\n', "epochs is out of place"),
    ('[trian]\nepochs = 3\n', "trian is out of place"),
    ('base = "{path}"\n', "base recipes go round in a loop"),
])
def test_a_malformed_recipe_gives_a_clear_error(text, message, tmp_path):
    path = tmp_path / "recipe.toml"
    path.write_text(text.format(path=path))
    result = CliRunner().invoke(main, ["train", "--dataset", "mnist", "--recipe", str(path),
                                       "--model-dir", str(tmp_path / "run")])
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_workers_train_under_multi_worker_mirrored(tmp_path):
    ports = [free_port(), free_port()]
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    args = [sys.executable, "-m", "capstf.cli", "train", "--dataset", "mnist", "--data-dir", "sample",
            "--model-dir", str(tmp_path / "run"), "--steps", "3", "--batch-size", "16",
            "--distribute", "multi-worker", "--precision", "float32", "--checkpoint-every", "2",
            "--set", "model.conv1_filters=16", "--set", "model.primary_caps_types=4"]
    workers = [subprocess.Popen(args, env={**os.environ, "TF_CONFIG": json.dumps(
        {"cluster": cluster, "task": {"type": "worker", "index": i}})}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = [w.communicate(timeout=300)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), outputs
    assert "2 replica(s)" in outputs[0]
    final = json.loads(outputs[0].strip().splitlines()[-1])
    assert final["step"] == 3 and np.isfinite(final["loss"])
    assert (tmp_path / "run" / "checkpoints" / "ckpt-3.index").is_file()
    assert not (tmp_path / "run" / "worker_scratch" / "1").exists()
