import numpy as np
import pytest
import tensorflow as tf

from capstf.config import ModelConfig
from capstf.model import build_model
from capstf.model.capsnet import mask_capsules
from capstf.model.losses import margin_loss, reconstruction_loss
from capstf.model.routing import capsule_length, route_by_agreement, squash


def test_squash_keeps_direction_and_maps_lengths_into_unit_interval():
    s = tf.random.normal([64, 16], stddev=3.0, seed=1)
    v = squash(s)
    lengths = tf.norm(v, axis=-1).numpy()
    assert np.all(lengths >= 0) and np.all(lengths < 1)
    cosine = tf.reduce_sum(tf.math.l2_normalize(s, -1) * tf.math.l2_normalize(v, -1), -1)
    np.testing.assert_allclose(cosine, 1.0, atol=1e-5)
    norm = tf.norm(s, axis=-1).numpy()
    np.testing.assert_allclose(lengths, norm ** 2 / (1 + norm ** 2), rtol=1e-4)


def test_squash_and_length_are_finite_at_zero():
    zero = tf.zeros([2, 8])
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(zero)
        v = squash(zero)
        length = capsule_length(v)
    assert np.all(np.isfinite(v.numpy())) and np.all(v.numpy() == 0)
    for target in (v, length):
        assert np.all(np.isfinite(tape.gradient(target, zero).numpy()))


def random_u_hat(batch=4, in_caps=30, out_caps=10, dim=16, seed=0):
    return tf.random.normal([in_caps, batch, out_caps, dim], stddev=0.1, seed=seed)


def test_coupling_coefficients_sum_to_one_over_parents():
    _, c = route_by_agreement(random_u_hat(), 3)
    np.testing.assert_allclose(tf.reduce_sum(c, axis=-1), 1.0, atol=1e-6)
    assert float(tf.math.reduce_std(c)) > 0  # routing moved them away from uniform


def test_routing_of_one_example_ignores_the_rest_of_its_batch():
    u_hat = random_u_hat(batch=5)
    alone, _ = route_by_agreement(u_hat[:, 2:3], 3)
    together, _ = route_by_agreement(u_hat, 3)
    np.testing.assert_allclose(alone[0], together[2], atol=1e-6)


def test_one_iteration_is_uniform_coupling():
    u_hat = random_u_hat()
    v, c = route_by_agreement(u_hat, 1)
    np.testing.assert_allclose(c, 0.1, atol=1e-7)
    np.testing.assert_allclose(v, squash(tf.reduce_sum(u_hat, 0) / 10), atol=1e-6)


@pytest.mark.parametrize("iterations", [1, 3])
def test_xla_and_plain_graph_give_the_same_outputs_and_gradients(iterations):
    model = build_model(ModelConfig(input_size=28, conv1_filters=16, primary_caps_types=4, routing_iters=iterations))
    batch = {"image": tf.random.uniform([8, 28, 28, 1], seed=6), "label": tf.range(8) % 10}

    def outputs_and_gradients():
        with tf.GradientTape() as tape:
            out = model(batch["image"], labels=batch["label"])
            loss = tf.reduce_mean(model.per_example_losses(out, batch)["loss"])
        return out, tape.gradient(loss, model.trainable_variables)

    results = []
    for jit in (True, False):
        model.jit_routing = jit
        results.append(outputs_and_gradients())
    (out_xla, grads_xla), (out_plain, grads_plain) = results
    for key in out_plain:
        np.testing.assert_allclose(out_xla[key], out_plain[key], atol=1e-5)
    for xla, plain in zip(grads_xla, grads_plain):
        assert float(tf.reduce_max(tf.abs(plain))) > 0
        np.testing.assert_allclose(xla, plain, atol=1e-5)


def test_parameter_counts_match_the_paper():
    # No bias on DigitCaps (the paper's equations have none): 8,215,568 at 28x28.
    assert build_model(ModelConfig(input_size=28)).count_params() == 8_215_568
    assert build_model(ModelConfig(input_size=28, decoder=False)).count_params() == 6_804_224
    assert build_model(ModelConfig(input_size=36, digits_per_image=2)).count_params() == 11_361_808
    assert round(build_model(ModelConfig(kind="baseline")).count_params() / 1e6, 1) == 35.4


def test_margin_loss_equals_hand_computed_values():
    lengths = tf.constant([[0.95, 0.3, 0.05], [0.5, 0.8, 0.2]])
    targets = tf.constant([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    expected = [0.5 * 0.2 ** 2, 0.5 * 0.4 ** 2 + 0.1 ** 2 + 0.7 ** 2]
    np.testing.assert_allclose(margin_loss(lengths, targets), expected, rtol=1e-5)


def test_reconstruction_loss_is_weighted_sum_of_squares():
    recon, target = tf.fill([2, 1, 3, 3, 1], 0.5), tf.zeros([2, 1, 3, 3, 1])
    np.testing.assert_allclose(reconstruction_loss(recon, target, 0.0005), [0.0005 * 9 * 0.25] * 2)


def test_masking_uses_labels_in_training_and_longest_capsule_at_inference():
    capsules = tf.random.normal([3, 10, 4], seed=3)
    masked = mask_capsules(capsules, tf.constant([[7], [0], [2]])).numpy().reshape(3, 10, 4)
    for row, keep in enumerate([7, 0, 2]):
        np.testing.assert_array_equal(masked[row, keep], capsules[row, keep])
        assert np.all(np.delete(masked[row], keep, axis=0) == 0)
    model = build_model(ModelConfig(input_size=28, conv1_filters=16, primary_caps_types=4))
    images = tf.random.uniform([4, 28, 28, 1], seed=4)
    out = model(images)
    longest = tf.argmax(out["probabilities"], -1, output_type=tf.int32)[:, None]
    np.testing.assert_allclose(out["reconstructions"], model.reconstruct(out["capsules"], longest), atol=1e-6)
    labels = (longest + 1) % 10
    trained = model(images, labels=labels[:, 0])
    np.testing.assert_allclose(trained["reconstructions"], model.reconstruct(out["capsules"], labels), atol=1e-6)


def test_two_label_inputs_get_one_reconstruction_per_label():
    model = build_model(ModelConfig(input_size=36, digits_per_image=2, conv1_filters=16, primary_caps_types=4))
    out = model(tf.random.uniform([2, 36, 36, 1]), labels=tf.constant([[1, 2], [3, 4]]))
    assert out["reconstructions"].shape == (2, 2, 36, 36, 1)


def test_gradients_reach_routing_weights_and_both_convolutions():
    model = build_model(ModelConfig(input_size=28, conv1_filters=16, primary_caps_types=4))
    batch = {"image": tf.random.uniform([4, 28, 28, 1], seed=5), "label": tf.constant([1, 2, 3, 4])}
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(model.per_example_losses(model(batch["image"], labels=batch["label"]), batch)["loss"])
    grads = dict(zip([v.path for v in model.trainable_variables], tape.gradient(loss, model.trainable_variables)))
    for name in ("conv1/kernel", "primary_caps/conv/kernel", "digit_caps/w"):
        grad = [g for path, g in grads.items() if path.endswith(name)]
        assert grad and float(tf.reduce_max(tf.abs(grad[0]))) > 0, name


def test_mixed_bfloat16_keeps_capsules_in_float32():
    model = build_model(ModelConfig(input_size=28, conv1_filters=16, primary_caps_types=4), precision="mixed_bfloat16")
    out = model(tf.random.uniform([2, 28, 28, 1]))
    assert out["probabilities"].dtype == tf.float32 and out["capsules"].dtype == tf.float32
    assert model.conv1.compute_dtype == "bfloat16"


@pytest.mark.parametrize("stride,size", [(1, 13), (2, 13), (2, 14)])  # 14: the last row is unused
def test_conv_gradients_equal_tensorflows_own(stride, size):
    from capstf.model.capsnet import conv2d_valid
    x = tf.random.normal([2, size, size, 16], seed=6)
    kernel = tf.random.normal([9, 9, 16, 4], seed=7)
    results = []
    for conv in (conv2d_valid, lambda a, k, s: tf.nn.conv2d(a, k, s, "VALID")):
        with tf.GradientTape() as tape:
            tape.watch([x, kernel])
            y = conv(x, kernel, stride)
            loss = tf.reduce_sum(y * tf.sin(y))
        results.append([y] + tape.gradient(loss, [x, kernel]))
    for ours, theirs in zip(*results):
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-3)
