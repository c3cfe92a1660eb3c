import dataclasses
import json
import os
import re
import socket
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner
from conftest import model_from_checkpoint_files, small_config

from capstf import config as config_lib
from capstf.cli import main
from capstf.errors import CapstfError, Preempted
from capstf.evaluate import evaluate
from capstf.checkpoints import list_checkpoints, restore_for_inference
from capstf.data.datasets import make_dataset
from capstf.train import GPU_STEPS_PER_CALL, FusedAdam, build_state, device_defaults, train


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
    for optimizer in (keras.optimizers.Adam(1e-2), FusedAdam(1e-2)):
        variables = [tf.Variable(w) for w in start]
        for g in grads:
            optimizer.apply_gradients(zip(g, variables))
        results.append([v.numpy() for v in variables])
    for keras_w, fused_w, w in zip(*results, start):
        assert np.abs(keras_w - w).max() > 1e-2  # five steps moved the weights
        np.testing.assert_allclose(fused_w, keras_w, rtol=1e-5, atol=1e-7)


def test_incompatible_model_dir_is_refused_and_other_changes_are_reported(tmp_path, capsys):
    train(small_config(steps=1), tmp_path, quiet=True)
    for setting, value, message in (("conv1_filters", 16, "conv1_filters: 32 -> 16"),
                                    ("decoder", False, "decoder: True -> False"),
                                    ("capsule_biases", True, "capsule_biases: False -> True")):
        cfg = small_config(steps=2, settings={f"model.{setting}": value})
        with pytest.raises(CapstfError, match=message):
            train(cfg, tmp_path, quiet=True)
    capsys.readouterr()
    # a loss weight and routing: no new shapes
    cfg = small_config(steps=2, learning_rate=2e-3, settings={"model.reconstruction_weight": 0.001, "model.routing_iters": 2})
    train(cfg, tmp_path, quiet=True)
    assert "resumed from step 1; settings changed since: model.routing_iters: 3 -> 2; model.reconstruction_weight: " \
           "0.0005 -> 0.001; train.steps: 1 -> 2; train.learning_rate: 0.001 -> 0.002" in capsys.readouterr().out


@pytest.mark.parametrize("setting, value, message", [("data.validation_digits", 0, "validation_digits: 1000 -> 0"),
                                                      ("train.seed", 1, "seed: 0 -> 1")])
def test_a_resume_that_would_change_the_training_examples_is_refused(tmp_path, setting, value, message):
    from capstf import config as config_lib
    first = small_config(steps=4, checkpoint_every=4, settings={"data.validation_digits": 1000})
    train(first, tmp_path / "run", quiet=True)
    changed = small_config(steps=6, settings={"data.validation_digits": 1000, setting: value})
    with pytest.raises(CapstfError, match=message):
        train(changed, tmp_path / "run", quiet=True)
    # A model dir with a config but no checkpoint yet has nothing to resume: the change is reported.
    assert setting in config_lib.check_compatible(first, changed, tmp_path / "run", resuming=False)


def test_multimnist_trains_and_scores_both_digits(tmp_path, test_digits):
    result = train(small_config("multimnist", steps=40, learning_rate=3e-3), tmp_path, quiet=True)
    assert np.isfinite(result["loss"]) and result["reconstruction_loss"] > 0
    metrics = evaluate(tmp_path, limit=200)
    # Counted here from the checkpoint's files: a pair is right when its two longest capsules are its two digits.
    pairs = next(iter(make_dataset(config_lib.load_saved(tmp_path).data, test_digits, "test", 200, seed=0)))
    probabilities = model_from_checkpoint_files(tmp_path)(pairs["image"])["probabilities"].numpy()
    both = [set(top) == set(label) for top, label in zip(np.argsort(probabilities)[:, -2:], pairs["label"].numpy())]
    assert 0 < np.mean(both) and metrics["both_correct_accuracy"] == pytest.approx(np.mean(both))
    assert metrics["examples"] == 200


@pytest.mark.parametrize("args, message", [
    (["train", "--dataset", "mnist", "--data-dir", "/no/such/dir", "--steps", "1"], "does not exist"),
    (["train", "--dataset", "mnist", "--data-dir", "sample", "--batch-size", "0"], "batch_size must be at least 1"),
    (["train", "--dataset", "mnist", "--set", "train.nonsense=3"], "Unknown setting"),
    (["train", "--dataset", "mnist", "--set", "train.steps=many"], "expected an integer"),
    (["train", "--dataset", "mnist", "--recipe", "nope"], "No recipe 'nope'"),
    (["train", "--dataset", "multimnist", "--set", "data.train_max_rotation_deg=10"], "for --dataset mnist and expanded-mnist only"),
    (["train", "--dataset", "mnist", "--set", "train.keep_checkpoints=0"], "keep_checkpoints must be at least 1"),
    (["train", "--dataset", "mnist", "--set", "model.primary_caps_dim=0"], "primary_caps_dim must be at least 1"),
    (["train", "--dataset", "mnist", "--set", "model.reconstruction_weight=-1"], "reconstruction_weight must be at least 0"),
    (["train", "--dataset", "mnist", "--set", "train.eval_examples=-1"], "eval_examples must be at least 0"),
    (["train", "--dataset", "mnist", "--set", "train.decay_rate=0"], "decay_rate must be in (0, 1]"),
    (["train", "--dataset", "expanded-mnist", "--set", "data.min_scale=1.3"], "0 < min_scale <= max_scale"),
    (["train", "--dataset", "mnist", "--set", "model.margin_loss_scale=0"], "margin_loss_scale must be above 0"),
    (["train", "--dataset", "mnist", "--set", "model.kind=baseline", "--set", "model.capsule_biases=true"],
     "model.capsule_biases is for CapsNets"),
    (["train", "--dataset", "mnist", "--set", "model.kind=baseline", "--set", "model.margin_loss_scale=0.05"],
     "model.margin_loss_scale is for CapsNets"),
    (["train", "--dataset", "mnist", "--set", "model.decoder=false", "--set", "model.decoder_init=truncated-normal-0.1"],
     "model.decoder_init needs a decoder"),
    (["train", "--dataset", "mnist", "--set", "model.decoder_init=zeros"], "choose one of glorot-uniform, truncated-normal-0.1"),
    (["train", "--dataset", "mnist", "--data-service", "localhost:5050"], "give the dispatcher as grpc://HOST:PORT"),
    (["train", "--dataset", "expanded-mnist", "--set", "model.kind=cnn-two-pools", "--set", "model.baseline_pool=true"],
     "model.baseline_pool and model.baseline_hidden shape model.kind = baseline"),
    (["evaluate", "--model-dir", "/no/such/model"], "no trained model"),
])
def test_bad_input_gives_a_clear_error(args, message, tmp_path):
    if args[0] == "train":
        args = args + ["--model-dir", str(tmp_path / "run")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
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


@pytest.mark.parametrize("name", config_lib.recipe_names())
def test_every_shipped_recipe_resolves_and_its_runlocal_is_a_short_run(name):
    full, local = config_lib.resolve(name), config_lib.resolve(name, runlocal=True)  # raise on a typo
    assert full.recipe == local.recipe == name and full.data.dataset == local.data.dataset
    assert 0 < local.train.steps <= 1200 and (full.train.steps == 0 or local.train.steps < full.train.steps)


def test_a_recipe_with_a_base_changes_only_what_it_lists():
    base, derived = config_lib.resolve("mnist-small"), config_lib.resolve("mnist-small-rotate-scale")
    assert base.data.train_max_rotation_deg == 0 < derived.data.train_max_rotation_deg
    assert derived.train.epochs == 2 * base.train.epochs and derived.recipe == "mnist-small-rotate-scale"
    derived = derived.with_settings({"data.train_max_rotation_deg": 0.0, "data.train_max_scale_change": 0.0,
                                     "train.epochs": base.train.epochs})
    assert dataclasses.replace(derived, recipe=base.recipe) == base
    assert config_lib.resolve("mnist-small-rotate-scale", runlocal=True).train.steps == 20  # base's [runlocal]
    grandchild = config_lib.resolve("mnist-small-rotate-scale-then-shift")  # a base's base applies too
    assert grandchild.data.train_max_rotation_deg == 15 and grandchild.model == base.model
    assert 0 < grandchild.data.train_rotate_scale_epochs < grandchild.train.epochs


def test_configs_are_frozen_and_a_change_returns_a_new_one():
    cfg = config_lib.resolve("mnist")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.steps = 3
    changed = cfg.with_settings({"train.steps": 3, "data.data_dir": "sample"})
    assert (changed.train.steps, changed.data.data_dir) == (3, "sample")
    assert (cfg.train.steps, cfg.data.data_dir) == (0, "")  # what was given is what it stays
    assert changed.model is cfg.model and changed.recipe == "mnist"


def test_the_image_set_recipes_share_a_base_that_is_not_a_recipe_itself():
    assert "bases/image-set" not in config_lib.recipe_names() and "image-set" not in config_lib.recipe_names()
    for name in ("cifar10", "smallnorb", "svhn", "tfds"):
        full, local = config_lib.resolve(name), config_lib.resolve(name, runlocal=True)
        train = full.train
        assert (train.batch_size, train.learning_rate, train.decay_rate, train.decay_steps) == (128, 1e-3, 0.96, 2000)
        assert full.model.decoder and full.model.reconstruction_weight == 0.0005
        assert (local.train.steps, local.train.batch_size, local.model.conv1_filters) == (10, 16, 16)
    assert config_lib.resolve("svhn").model.conv1_filters == 64  # a recipe's own setting over the base's


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
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_two_workers(model_dir, steps, checkpoint_every=2, *extra_args, second_model_dir=None):
    """`capstf train` as two MultiWorkerMirroredStrategy workers on 127.0.0.1 (Popen objects);
    worker 1 is told second_model_dir, if given (as if it could not see worker 0's)."""
    ports = [free_port(), free_port()]
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    args = lambda model_dir: [
        sys.executable, "-m", "capstf.cli", "train", "--dataset", "mnist", "--data-dir", "sample",
        "--model-dir", str(model_dir), "--steps", str(steps), "--batch-size", "16",
        "--distribute", "multi-worker", "--precision", "float32", "--checkpoint-every", str(checkpoint_every),
        "--set", "model.conv1_filters=16", "--set", "model.primary_caps_types=4", *extra_args]
    return [subprocess.Popen(args(second_model_dir if i and second_model_dir else model_dir), env={
        **os.environ, "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]


def run_two_workers(model_dir, steps, checkpoint_every=2):
    """Two workers trained to the end; their outputs."""
    workers = start_two_workers(model_dir, steps, checkpoint_every)
    outputs = [w.communicate(timeout=300)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), outputs
    return outputs


def test_two_workers_train_under_multi_worker_mirrored(tmp_path):
    outputs = run_two_workers(tmp_path / "run", 3)
    assert "on 2 CPU replica(s)" in outputs[0]
    final = json.loads(outputs[0].strip().splitlines()[-1])
    assert final["step"] == 3 and np.isfinite(final["loss"])
    assert (tmp_path / "run" / "checkpoints" / "ckpt-3.index").is_file()
    assert not (tmp_path / "run" / "worker_scratch" / "1").exists()
    # A worker that cannot see the chief's checkpoints (here: another --model-dir) would start
    # from step 0 with other weights: every worker refuses, naming it.
    workers = start_two_workers(tmp_path / "run", 5, second_model_dir=tmp_path / "not-shared")
    outputs = [w.communicate(timeout=300)[0] for w in workers]
    assert [w.returncode for w in workers] == [2, 2], outputs
    for output in outputs:
        assert "capstf: error: The workers did not restore the same state: the chief is at step 3 (48 examples " \
               "seen), worker 1 is at step 0 (0 examples seen)" in output and "Traceback" not in output
    assert [step for step, _ in list_checkpoints(tmp_path / "run")] == [2, 3]  # nothing trained
    # The finished run again, with the same --steps: worker 1's scratch went with the first run,
    # and neither worker may save alone (saving is collective: the other would wait forever).
    workers = start_two_workers(tmp_path / "run", 3)
    outputs = [w.communicate(timeout=120)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs
    assert "resumed from step 3; already trained past --steps 3" in outputs[0]


@pytest.mark.parametrize("gpus, precision", [([(9, 0)], "mixed_bfloat16"), ([(8, 0), (8, 6)], "mixed_bfloat16"),
                                             ([(7, 0)], "mixed_float16"), ([(8, 0), (7, 5)], "mixed_float16"),
                                             ([(6, 1)], "float32")])
def test_gpu_precision_follows_the_compute_capability(gpus, precision):
    assert device_defaults(small_config(precision="auto").train, gpus=gpus) == \
        ("routing", precision, False, GPU_STEPS_PER_CALL)


# /proc/cpuinfo's flags on this project's three CPUs (the relevant ones), and what was measured
# fastest on each (docs/performance.md): precision, and whether the convolution gradients are
# capstf's forward convolutions.
CPU_FLAGS = {"AMD EPYC, AVX2 only": ({"avx", "avx2", "fma"}, "float32", False),
             "AMD EPYC, AVX512-BF16": ({"avx2", "avx512f", "avx512bw", "avx512_bf16"}, "mixed_bfloat16", True),
             "Intel Xeon, AMX": ({"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}, "mixed_bfloat16", True)}


@pytest.mark.parametrize("cpu_name", CPU_FLAGS)
def test_each_cpu_gets_the_defaults_measured_fastest_on_it(monkeypatch, cpu_name):
    import capstf.cpu
    flags, precision, forward_conv_gradients = CPU_FLAGS[cpu_name]
    monkeypatch.setattr(capstf.cpu, "flags", lambda: frozenset(flags))
    assert device_defaults(small_config(precision="auto").train, gpus=[]) == \
        ("routing", precision, forward_conv_gradients, 1)  # one step per call: see device_defaults


def test_cpu_flags_are_read_from_the_flags_line(tmp_path, monkeypatch):
    import builtins

    import capstf.cpu
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: AMD EPYC avx512f in its name\n"
                       "flags\t\t: fpu sse avx2 fma\nbugs\t\t: avx512_bf16_bug\n")
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda path, *a, **k: real_open(
        cpuinfo if path == "/proc/cpuinfo" else path, *a, **k))
    capstf.cpu.flags.cache_clear()
    try:
        assert capstf.cpu.flags() == {"fpu", "sse", "avx2", "fma"} and capstf.cpu.describe() == "avx2"
    finally:
        capstf.cpu.flags.cache_clear()


def test_settings_asked_for_are_kept():
    chosen = device_defaults(small_config(precision="float32", steps_per_call=3).train, gpus=[(9, 0)])
    assert (chosen.precision, chosen.steps_per_call) == ("float32", 3)  # as asked, not the GPU's


def recording_call_lengths(monkeypatch, before_call=lambda calls: None):
    """The length of each compiled call `train` makes (before_call(lengths so far) runs first)."""
    import capstf.train as train_module
    make_call, lengths = train_module.make_train_call, []

    def recording(*args):
        call = make_call(*args)

        def recorded(iterator, steps=1, stop_requested=False):
            lengths.append(steps)
            before_call(lengths)
            return call(iterator, steps, stop_requested)
        return recorded
    monkeypatch.setattr(train_module, "make_train_call", recording)
    return lengths


def final_weights(model_dir):
    return [v.numpy() for v in model_from_checkpoint_files(model_dir).trainable_variables]


@pytest.mark.parametrize("distribute", ["one-device", "mirrored"])  # mirrored: 2 logical CPU replicas
def test_eight_steps_per_call_train_exactly_like_one(tmp_path, monkeypatch, distribute):
    lengths = recording_call_lengths(monkeypatch)
    for n in (1, 8):
        train(small_config(steps=16, steps_per_call=n, log_every=16, distribute=distribute), tmp_path / str(n),
              quiet=True)
    assert lengths == [1] * 16 + [8, 8]
    for one, eight in zip(final_weights(tmp_path / "1"), final_weights(tmp_path / "8")):
        np.testing.assert_array_equal(one, eight)


def test_checkpoints_come_at_their_steps_whatever_the_call_length(tmp_path, monkeypatch):
    lengths = recording_call_lengths(monkeypatch)
    train(small_config(steps=16, steps_per_call=8, checkpoint_every=6, log_every=100, keep_checkpoints=10),
          tmp_path, quiet=True)
    assert lengths == [6, 6, 4]  # each call ends at the next checkpoint, or the run's end
    assert [step for step, _ in list_checkpoints(tmp_path)] == [6, 12, 16]


def test_a_sigterm_during_a_call_checkpoints_the_step_it_ended_on_and_resumes_exactly(tmp_path, monkeypatch):
    import os
    import signal
    # The signal comes as the second call starts: its 8 steps run, then the run stops.
    recording_call_lengths(monkeypatch, lambda lengths: len(lengths) == 2 and os.kill(os.getpid(), signal.SIGTERM))
    cfg = small_config(steps=24, steps_per_call=8, log_every=8, checkpoint_every=100)
    with pytest.raises(Preempted, match="stopped by SIGTERM after step 16 of 24"):
        train(cfg, tmp_path / "stopped", quiet=True)
    assert [step for step, _ in list_checkpoints(tmp_path / "stopped")] == [16]
    monkeypatch.undo()
    train(cfg, tmp_path / "stopped", quiet=True)
    train(cfg, tmp_path / "straight", quiet=True)
    for resumed, straight in zip(final_weights(tmp_path / "stopped"), final_weights(tmp_path / "straight")):
        np.testing.assert_allclose(resumed, straight, atol=1e-6)


def test_a_resumed_run_with_another_batch_size_goes_on_from_the_examples_seen(tmp_path, monkeypatch):
    import capstf.train as train_module
    starts = []
    make_dataset = train_module.make_dataset

    def recording(*args, **kwargs):
        if args[2] == "train":
            starts.append(kwargs["start_example"])
        return make_dataset(*args, **kwargs)
    monkeypatch.setattr(train_module, "make_dataset", recording)
    first = train(small_config(steps=3, batch_size=8), tmp_path, quiet=True)
    second = train(small_config(steps=5, batch_size=16), tmp_path, quiet=True)
    assert starts == [0, 3 * 8]
    assert (first["examples_seen"], second["examples_seen"]) == (24, 24 + 2 * 16)
    assert 0 < first["train_seconds"] < second["train_seconds"]


@pytest.mark.parametrize("line, message", [('steps = "5"', "train.steps = '5': expected an integer"),
                                           ("schedule = 3", "train.schedule = 3: expected a string"),
                                           ("epochs = true", "train.epochs = True: expected a number")])
def test_a_recipe_value_of_the_wrong_type_is_named(tmp_path, line, message):
    recipe = tmp_path / "typo.toml"
    recipe.write_text(f'base = "mnist"\n[train]\n{line}\n')
    with pytest.raises(CapstfError, match=message):
        config_lib.resolve(str(recipe))


def test_evaluating_the_training_split_is_one_deterministic_unshifted_pass(trained_mnist):
    model_dir, _ = trained_mnist
    first = evaluate(model_dir, split="train")
    assert first["examples"] == first["available_examples"] == 5000
    assert evaluate(model_dir, split="train")["accuracy"] == first["accuracy"]


def test_a_finished_multi_worker_run_extended_resumes_every_worker_from_the_chiefs_checkpoint(tmp_path):
    run_two_workers(tmp_path / "straight", 5)
    run_two_workers(tmp_path / "extended", 3)  # finishes; worker 1's scratch copy is deleted
    assert not (tmp_path / "extended" / "worker_scratch" / "1").exists()
    run_two_workers(tmp_path / "extended", 5)  # both workers must go on from the chief's step 3
    cfg = config_lib.load_saved(tmp_path / "straight")
    step_a, a = weights(tmp_path / "straight", cfg)
    step_b, b = weights(tmp_path / "extended", cfg)
    assert step_a == step_b == 5
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, atol=1e-6)


@pytest.fixture
def step_batch(train_digits):
    """32 training digits, every class among them, as one batch."""
    images = train_digits.images[::150][:32, ..., None].astype("float32") / 255
    return {"image": images, "label": train_digits.labels[::150][:32]}


def one_step_update(model, optimizer, strategy, batch):
    """What one step of `make_train_call` on `batch` adds to each trainable variable."""
    from capstf.train import make_train_call
    start = [v.numpy() for v in model.trainable_variables]
    data = strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensor_slices(batch).batch(32))
    make_train_call(model, optimizer, strategy, 32, False)(iter(data))
    return [v.numpy() - s for v, s in zip(model.trainable_variables, start)]


def test_mirrored_replicas_compute_the_one_device_sgd_step(step_batch):
    """Plain SGD: a replica averaging its loss over its own half of the batch would double the
    gradient (Adam's normalisation would hide that)."""
    from capstf.model import build_model
    cfg = small_config()
    results = []
    for strategy in (tf.distribute.OneDeviceStrategy("/cpu:0"), tf.distribute.MirroredStrategy(
            ["/cpu:0", "/cpu:1"], cross_device_ops=tf.distribute.ReductionToOneDevice())):
        with strategy.scope():
            keras.utils.set_random_seed(0)
            model = build_model(cfg.model, jit_routing=False)
            optimizer = keras.optimizers.SGD(1.0)
            optimizer.build(model.trainable_variables)
        results.append(one_step_update(model, optimizer, strategy, step_batch))
    for one, two in zip(*results):
        assert np.abs(one).max() > 0
        np.testing.assert_allclose(two, one, rtol=1e-3, atol=1e-6)  # a doubled gradient is off by 100%


def test_the_loss_scaled_float16_step_applies_the_float32_gradient(step_batch):
    """mixed_float16, the default on 7.x GPUs: the loss scale enters the compiled capsule
    gradients and, through them, the convolutions' chained gradient; the optimizer must see it
    undone. Scaled twice, or never, every update is off by the scale (32,768x here)."""
    from capstf.model import build_model
    cfg = small_config()
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    updates, initial = [], None
    for precision in ("float32", "mixed_float16"):
        with strategy.scope():
            model = build_model(cfg.model, jit_routing=True, precision=precision, forward_conv_gradients=False)
            optimizer = keras.optimizers.SGD(100.0)  # updates far above the float32 rounding of the weights
            if precision == "mixed_float16":
                # Keras' own initial scale, what a real run starts from: it lifts conv1's output
                # gradients (~1e-9 unscaled) into float16's normal range (from 6.1e-5). A scale
                # of 256 left them subnormal, which AVX2-only CPUs cannot carry: TF's float16
                # convolution gradient there multiplies in float16, each product below 6e-8 is
                # 0, and 93% of conv1's output gradients were (AVX-512 CPUs kept them). No
                # float16 gradient overflows at this scale (the largest is ~2e-3), so no step
                # is skipped.
                optimizer = keras.optimizers.LossScaleOptimizer(optimizer, initial_scale=2**15)
            optimizer.build(model.trainable_variables)
        initial = initial or [v.numpy() for v in model.trainable_variables]
        for variable, value in zip(model.trainable_variables, initial):
            variable.assign(value)
        updates.append(one_step_update(model, optimizer, strategy, step_batch))
    assert model.conv1.compute_dtype == "float16"
    for variable, full, half in zip(model.trainable_variables, *updates):
        if "decoder" in variable.path and "kernel" in variable.path:
            continue  # their first gradients (~1e-10) leave updates at the rounding of their weights
        full, half = full.ravel().astype(np.float64), half.ravel().astype(np.float64)
        assert np.abs(full).max() > 0
        # The same update up to float16's rounding: as long and pointing the same way (measured:
        # within 0.1%, cosine above 0.9999). A scale applied twice, or never, is 32,768x off; at
        # a scale of 256 on an AVX2 CPU the flushed gradients left conv1's update 0.92 as long,
        # cosine 0.993. Element by element, the smallest entries of the decoder's biases differ
        # by up to 12% of themselves, as the CPU's threads happen to split the float16 work.
        norm_half, norm_full = np.linalg.norm(half), np.linalg.norm(full)
        ratio, cosine = norm_half / norm_full, half @ full / (norm_half * norm_full)
        assert 0.97 < ratio < 1.03 and cosine > 0.999, (variable.path, ratio, cosine)


def test_float16_steps_whose_update_is_skipped_still_count(tmp_path, monkeypatch):
    """A scale that overflows every float16 gradient: the loss-scale optimizer skips each update
    (halving its scale) and its iteration count stays 0, while 4 steps of data went by."""
    class Overflowing(keras.optimizers.LossScaleOptimizer):
        def __init__(self, inner_optimizer, **kwargs):
            super().__init__(inner_optimizer, initial_scale=2.0 ** 100, **kwargs)
    monkeypatch.setattr(keras.optimizers, "LossScaleOptimizer", Overflowing)  # what build_state makes
    cfg = small_config(steps=4, precision="mixed_float16", checkpoint_every=100)
    result = train(cfg, tmp_path, quiet=True)
    assert (result["step"], result["examples_seen"]) == (4, 4 * 32)
    assert [step for step, _ in list_checkpoints(tmp_path)] == [4]
    reader = tf.train.load_checkpoint(list_checkpoints(tmp_path)[-1][1])
    assert reader.get_tensor("optimizer/inner_optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE") == 0  # all skipped
    resumed = train(small_config(steps=6, precision="mixed_float16", checkpoint_every=100), tmp_path, quiet=True)
    assert (resumed["step"], resumed["examples_seen"]) == (6, 6 * 32)  # 2 more steps, not 6
    assert [step for step, _ in list_checkpoints(tmp_path)] == [4, 6]


def test_evaluate_starts_without_tensorflow_log_lines(trained_mnist):
    model_dir, _ = trained_mnist
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}  # as a user's shell has it
    done = subprocess.run([sys.executable, "-m", "capstf.cli", "evaluate", "--model-dir", str(model_dir),
                           "--limit", "100"], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["examples"] == 100
    for line in (done.stdout + done.stderr).splitlines():
        assert not re.match(r"[IWEF]\d{4} |WARNING: All log messages before absl", line), line
        assert "cuda" not in line.lower() and "oneDNN" not in line, line


def test_version_and_an_example_in_every_commands_help():
    from capstf.cli import main as cli
    assert CliRunner().invoke(cli, ["--version"]).output.strip() == "capstf, version 0.1.0"
    commands = [[name] for name in cli.commands if name != "visualize"] + \
        [["visualize", name] for name in cli.commands["visualize"].commands]
    for command in commands:
        help_text = CliRunner().invoke(cli, command + ["--help"]).output
        assert "Example: capstf " + command[0] in help_text, command


def test_an_ensemble_scores_the_average_of_its_models_capsule_lengths(tmp_path, test_digits):
    for seed in (0, 1):
        train(small_config(steps=10, seed=seed, learning_rate=3e-3), tmp_path / str(seed), quiet=True)
    images = test_digits.images[:200, ..., None].astype("float32") / 255
    lengths = [model_from_checkpoint_files(tmp_path / str(s), 10)(images)["probabilities"].numpy() for s in (0, 1)]
    assert not np.allclose(lengths[0], lengths[1])  # two models, or the average would be either one's
    expected = np.mean(np.argmax((lengths[0] + lengths[1]) / 2, axis=1) == test_digits.labels[:200])
    result = CliRunner().invoke(main, ["evaluate", "--model-dir", str(tmp_path / "0"), "--model-dir",
                                       str(tmp_path / "1"), "--limit", "200"])
    metrics = json.loads(result.output)
    assert metrics["accuracy"] == pytest.approx(expected) and len(metrics["ensemble"]) == 2


def test_held_out_validation_digits_are_never_trained_on_and_score_per_epoch(tmp_path, capsys, monkeypatch,
                                                                            train_digits):
    import capstf.data.sources as sources
    import capstf.train as train_module
    from capstf.data.sources import load_examples
    cfg = small_config(steps=4, eval_examples=300, settings={"data.validation_digits": 1000})
    trained_on, files_read = [], []
    make_dataset, read_idx = train_module.make_dataset, sources.read_idx

    def recording(data_cfg, digits, split, *args, **kwargs):
        if split == "train":
            trained_on.append(digits)
        return make_dataset(data_cfg, digits, split, *args, **kwargs)
    monkeypatch.setattr(train_module, "make_dataset", recording)
    monkeypatch.setattr(sources, "read_idx", lambda path, magic: files_read.append(path.name)
                        or read_idx(path, magic))
    train(cfg, tmp_path, quiet=True)
    # Trained on the first 4,000 of the 5,000 sample digits, image for image; the last 1,000 held out.
    assert np.array_equal(trained_on[0].images, train_digits.images[:4000])
    assert np.array_equal(trained_on[0].labels, train_digits.labels[:4000])
    # The training split is read once for both parts; the test digits are not needed.
    assert sorted(name.split(".")[0] for name in files_read) == ["train-images-idx3-ubyte",
                                                                  "train-labels-idx1-ubyte"]
    assert "validation accuracy" in capsys.readouterr().out
    metrics = evaluate(tmp_path, split="validation")
    held_out = train_digits.images[-1000:, ..., None].astype("float32") / 255
    predicted = np.argmax(model_from_checkpoint_files(tmp_path, 4)(held_out)["probabilities"].numpy(), 1)
    expected = np.mean(predicted == train_digits.labels[-1000:])
    assert metrics["examples"] == 1000 and metrics["accuracy"] == pytest.approx(expected)
    with pytest.raises(CapstfError, match="holds out no validation digits"):
        load_examples("sample", "validation")


def test_multi_worker_run_killed_after_a_checkpoint_resumes_even_without_a_workers_scratch(tmp_path):
    import shutil
    import signal
    import time
    run_two_workers(tmp_path / "straight", 120, checkpoint_every=10)
    from capstf.checkpoints import list_checkpoints
    workers = start_two_workers(tmp_path / "killed", 120, checkpoint_every=10)
    deadline = time.time() + 240
    # Recorded, not only written: its .index file appears before the checkpoint list names it.
    while time.time() < deadline and not list_checkpoints(tmp_path / "killed"):
        time.sleep(0.05)
    for worker in workers:  # both killed without warning after the chief's first checkpoint
        worker.send_signal(signal.SIGKILL)
        worker.wait()
    assert 0 < list_checkpoints(tmp_path / "killed")[-1][0] < 120  # killed mid-run
    shutil.rmtree(tmp_path / "killed" / "worker_scratch", ignore_errors=True)  # worker 1 back on a fresh disk
    run_two_workers(tmp_path / "killed", 120, checkpoint_every=10)
    cfg = config_lib.load_saved(tmp_path / "straight")
    (step_a, a), (step_b, b) = weights(tmp_path / "straight", cfg), weights(tmp_path / "killed", cfg)
    assert step_a == step_b == 120
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, atol=1e-6)


def test_sigterm_to_one_worker_stops_every_worker_after_the_same_step_and_the_run_resumes(tmp_path):
    import signal
    import time
    from capstf.checkpoints import list_checkpoints
    run_two_workers(tmp_path / "straight", 80, 1000)
    workers = start_two_workers(tmp_path / "stopped", 80, 1000, "--set", "train.log_every=1")
    events = tmp_path / "stopped" / "train"
    deadline = time.time() + 240
    while time.time() < deadline and not (events.is_dir() and any(p.stat().st_size > 2000 for p in events.iterdir())):
        time.sleep(0.1)  # TensorBoard scalars appear once steps run
    workers[1].send_signal(signal.SIGTERM)  # the worker, not the chief: the chief must hear of it
    outputs = [w.communicate(timeout=120)[0] for w in workers]
    assert [w.returncode for w in workers] == [143, 143], outputs
    assert "stopped by a stop request to another worker" in outputs[0] and "stopped by SIGTERM" in outputs[1]
    stopped_at = list_checkpoints(tmp_path / "stopped")[-1][0]
    assert 0 < stopped_at < 80  # written at the stop: no checkpoint was due before the end
    run_two_workers(tmp_path / "stopped", 80, 1000)
    cfg = config_lib.load_saved(tmp_path / "straight")
    (step_a, a), (step_b, b) = weights(tmp_path / "straight", cfg), weights(tmp_path / "stopped", cfg)
    assert step_a == step_b == 80
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, atol=1e-6)


def test_without_a_terminal_training_prints_a_line_every_log_every_steps(tmp_path, capsys):
    train(small_config(steps=10, log_every=5), tmp_path, quiet=True)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert [line.split(" (")[0] for line in lines] == ["step 5/10", "step 10/10"]
    assert re.fullmatch(r"step 5/10 \(epoch 0\.03\): loss \d\.\d{4}, accuracy \d\.\d{3}, \d+ examples/s, "
                        r"0:\d\d:\d\d left", lines[0])
    assert lines[1].endswith(", 0:00:00 left")


def test_workers_end_their_calls_at_the_same_steps_though_only_the_chief_evaluates(tmp_path):
    # 5,000 digits at batch 512: an epoch of 9 steps ends inside a call of 4. The chief evaluates
    # after step 9; every worker's calls must end there too, each call being collective.
    workers = start_two_workers(tmp_path / "run", 12, 12, "--batch-size", "512", "--steps-per-call", "4",
                                "--eval-examples", "16")
    try:
        outputs = [w.communicate(timeout=300)[0] for w in workers]
    finally:
        for w in workers:
            w.kill()
    assert [w.returncode for w in workers] == [0, 0], outputs
    assert "step 9 (epoch 1.00): test accuracy" in outputs[0]
    assert json.loads(outputs[0].strip().splitlines()[-1])["step"] == 12
