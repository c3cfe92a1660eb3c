"""capstf.layers and capstf.losses in people's own Keras models."""
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

import capstf.layers as caps
from capstf.config import ModelConfig
from capstf.losses import MarginLoss, ReconstructionLoss, margin_loss
from capstf.model import build_model


def small_capsnet(with_decoder=True):
    """A functional CapsNet of the public layers: small, for tests."""
    images = keras.Input([28, 28, 1])
    labels = keras.Input([], dtype="int32")
    features = keras.layers.Conv2D(16, 9, activation="relu")(images)
    primary = caps.PrimaryCapsules(types=4, dim=8)(features)  # [batch, 144, 8]
    capsules = caps.DigitCapsules(num_capsules=10, dim=16, routing_iters=3)(primary)
    lengths = caps.CapsuleLength(name="lengths")(capsules)
    if not with_decoder:
        return keras.Model(images, lengths)
    decoded = keras.layers.Dense(28 * 28, activation="sigmoid")(caps.CapsuleMask()([capsules, labels]))
    reconstruction = keras.layers.Reshape([28, 28, 1], name="reconstruction")(decoded)
    return keras.Model([images, labels], [lengths, reconstruction])


def test_a_functional_capsnet_learns_with_compile_and_fit(train_digits):
    keras.utils.set_random_seed(0)
    model = small_capsnet()
    images = train_digits.images[::10, ..., None].astype("float32") / 255  # 500 digits
    one_hot = np.eye(10, dtype="float32")[train_digits.labels[::10]]
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss=[MarginLoss(), ReconstructionLoss(0.0005)])
    history = model.fit([images, train_digits.labels[::10]], [one_hot, images], batch_size=25, epochs=3,
                        shuffle=True, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < 0.6 * losses[0]


def test_the_layers_pages_example_trains_and_its_model_draws_the_longest_capsule(train_digits):
    page = (Path(__file__).resolve().parents[1] / "docs" / "layers.md").read_text()
    code = textwrap.dedent(page.split("<!-- example: layers -->\n")[1].split("<!-- end example -->")[0])
    keras.utils.set_random_seed(0)
    x, y = train_digits.images[::78, ..., None].astype("float32") / 255, train_digits.labels[::78]  # 65, every class
    scope = {"x": x, "y": y}
    exec(code.replace("epochs=10", "epochs=1"), scope)
    assert {"loss", "lengths_loss", "reconstruction_loss"} <= set(scope["history"].history)
    scores, drawn = scope["scores"], scope["drawn"]
    assert scores.shape == (8, 10) and drawn.shape == (8, 28, 28, 1)
    # The kept model's decoder drew each digit from its longest capsule, recomputed here by hand.
    capsules = keras.Model(scope["images"], scope["capsules"]).predict(x[:8], verbose=0)  # [8, 10, 16]
    longest = np.argmax(np.linalg.norm(capsules, axis=-1), axis=1)
    masked = np.zeros_like(capsules)
    masked[np.arange(8), longest] = capsules[np.arange(8), longest]
    np.testing.assert_allclose(drawn, scope["decoder"].predict(masked.reshape(8, -1), verbose=0), atol=1e-5)
    np.testing.assert_allclose(scores, np.sqrt(np.sum(capsules ** 2, axis=-1) + 1e-7), rtol=1e-5)


def test_sequential_model_with_capsule_layers_gives_class_lengths():
    model = keras.Sequential([keras.Input([28, 28, 1]), keras.layers.Conv2D(8, 9, activation="relu"),
                              caps.PrimaryCapsules(2, 4), caps.DigitCapsules(3, 5), caps.CapsuleLength()])
    assert model.output_shape == (None, 3)
    images = tf.random.uniform([2, 28, 28, 1], seed=3)
    lengths = model(images).numpy()
    capsules = keras.Model(model.inputs, model.layers[-2].output)(images).numpy()  # [batch, 3, 5]
    assert capsules.shape == (2, 3, 5)
    # Each class's length is its capsule's, with capsule_length's 1e-7 under the root (a finite
    # gradient at 0): untrained capsules are ~1e-4 long, so the floor is part of the answer.
    np.testing.assert_allclose(lengths, np.sqrt(np.sum(capsules ** 2, axis=-1) + 1e-7), rtol=1e-5)


def test_saved_keras_model_loads_in_a_fresh_process_with_identical_outputs(tmp_path):
    keras.utils.set_random_seed(1)
    model = small_capsnet()
    images = np.random.default_rng(0).uniform(size=(3, 28, 28, 1)).astype("float32")
    labels = np.array([1, 2, 3], "int32")
    expected = [o.numpy() for o in model([images, labels])]
    model.save(tmp_path / "m.keras")
    np.savez(tmp_path / "io.npz", images=images, labels=labels, lengths=expected[0], reconstruction=expected[1])
    script = f"""
import numpy as np, keras
import capstf.layers  # registers the capsule layers with keras.saving
io = np.load({str(tmp_path / "io.npz")!r})
model = keras.models.load_model({str(tmp_path / "m.keras")!r})
lengths, reconstruction = model([io["images"], io["labels"]])
assert np.array_equal(lengths, io["lengths"]) and np.array_equal(reconstruction, io["reconstruction"])
assert model.layers[3].routing_iters == 3
print("same outputs")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "same outputs" in done.stdout, done.stderr[-2000:]


def test_capsule_mask_keeps_the_given_or_the_longest_capsules():
    capsules = tf.constant(np.random.default_rng(2).normal(size=(2, 4, 3)), tf.float32)
    kept = caps.CapsuleMask()([capsules, tf.constant([3, 0])]).numpy().reshape(2, 4, 3)
    np.testing.assert_array_equal(kept[0, 3], capsules[0, 3])
    np.testing.assert_array_equal(kept[1, 0], capsules[1, 0])
    assert np.count_nonzero(kept) == 2 * 3
    lengths = np.linalg.norm(capsules.numpy(), axis=-1)
    two = caps.CapsuleMask(count=2)(capsules).numpy().reshape(2, 2, 4, 3)
    for example in range(2):
        longest = np.argsort(-lengths[example])[:2]
        for k in range(2):
            np.testing.assert_array_equal(two[example, k, longest[k]], capsules[example, longest[k]])
            assert np.count_nonzero(two[example, k]) == 3


def test_margin_loss_class_matches_the_paper_for_one_and_two_hot_targets():
    lengths = tf.constant([[0.95, 0.05, 0.5], [0.2, 0.7, 0.3]])
    one_two_hot = tf.constant([[1.0, 0, 0], [1, 1, 0]])
    # By hand: example 1: 0 + 0 + 0.5 * 0.4^2 = 0.08; example 2: 0.7^2 + 0.2^2 + 0.5 * 0.2^2 = 0.55
    np.testing.assert_allclose(margin_loss(lengths, one_two_hot), [0.08, 0.55], atol=1e-6)
    np.testing.assert_allclose(MarginLoss()(one_two_hot, lengths), (0.08 + 0.55) / 2, atol=1e-6)
    with pytest.raises(ValueError, match="m_minus < m_plus"):
        MarginLoss(m_plus=0.1, m_minus=0.9)


def test_layers_reject_bad_arguments():
    with pytest.raises(ValueError, match="types must be a positive integer"):
        caps.PrimaryCapsules(types=0, dim=8)
    with pytest.raises(ValueError, match="routing_gradients='some'"):
        caps.DigitCapsules(10, 16, routing_gradients="some")


def test_capsule_layers_stay_float32_under_mixed_precision():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        layer = caps.DigitCapsules(10, 16)
        out = layer(tf.random.uniform([2, 12, 8]))
        assert out.dtype == tf.float32 and layer.compute_dtype == "float32"
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_capstf_capsnet_is_built_from_the_public_layers():
    model = build_model(ModelConfig(input_size=28))
    assert model.count_params() == 8_215_568
    assert isinstance(model.primary, caps.PrimaryCapsules) and isinstance(model.digit, caps.DigitCapsules)
    assert isinstance(model.length, caps.CapsuleLength) and isinstance(model.mask, caps.CapsuleMask)


def test_capsule_layers_fit_under_a_mirrored_strategy_like_on_one_device(train_digits):
    images = train_digits.images[::50, ..., None].astype("float32") / 255  # 100 digits
    one_hot = np.eye(10, dtype="float32")[train_digits.labels[::50]]
    weights = []
    for strategy in (tf.distribute.OneDeviceStrategy("/cpu:0"), tf.distribute.MirroredStrategy(
            ["/cpu:0", "/cpu:1"], cross_device_ops=tf.distribute.ReductionToOneDevice())):
        with strategy.scope():
            keras.utils.set_random_seed(3)
            model = small_capsnet(with_decoder=False)
            model.compile(optimizer=keras.optimizers.SGD(0.5), loss=MarginLoss())
        model.fit(images, one_hot, batch_size=20, epochs=1, shuffle=False, verbose=0)
        weights.append([w.numpy() for w in model.trainable_weights])
    for one, two in zip(*weights):
        np.testing.assert_allclose(two, one, rtol=1e-3, atol=1e-5)
