import keras
import numpy as np
import pytest
import tensorflow as tf

from capstf.config import ModelConfig
from capstf.model import build_model
from capstf.layers import capsule_length, mask_capsules, route_by_agreement, squash
from capstf.losses import margin_loss, reconstruction_loss


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


def procedure1(u_hat, iterations):
    """Procedure 1 of the paper, literally, one example at a time, in float64.

    u_hat: [batch, in_caps, out_caps, dim] -> v: [batch, out_caps, dim].
    """
    outputs = []
    for u in tf.unstack(u_hat):  # [in_caps, out_caps, dim]: routing is per example
        b = tf.zeros(u.shape[:2], tf.float64)  # b_ij <- 0
        for _ in range(iterations):
            c = tf.nn.softmax(b, axis=1)  # c_i <- softmax(b_i), over the parents j
            s = tf.reduce_sum(c[:, :, None] * u, axis=0)  # s_j <- sum_i c_ij u_hat_j|i
            norm = tf.norm(s, axis=-1, keepdims=True)
            v = norm ** 2 / (1 + norm ** 2) * s / norm  # v_j <- squash(s_j)
            b = b + tf.reduce_sum(u * v[None], axis=-1)  # b_ij <- b_ij + u_hat_j|i . v_j
        outputs.append(v)
    return tf.stack(outputs)


def routed_and_gradient(route, u_hat, weights):
    """route(u_hat) and the gradient of sum(route(u_hat) * weights) with respect to u_hat."""
    with tf.GradientTape() as tape:
        tape.watch(u_hat)
        v = route(u_hat)
        objective = tf.reduce_sum(v * weights)
    return v, tape.gradient(objective, u_hat)


@pytest.mark.parametrize("iterations", [1, 2, 3])
def test_routing_matches_procedure_1_in_values_and_gradients(iterations):
    u_hat = tf.random.normal([3, 20, 10, 16], stddev=0.5, seed=11, dtype=tf.float64)  # [batch, in, out, dim]
    weights = tf.random.normal([3, 10, 16], seed=12, dtype=tf.float64)
    expected, expected_grad = routed_and_gradient(lambda u: procedure1(u, iterations), u_hat, weights)
    for gradients in ("all", "final"):
        ours = lambda u: tf.cast(route_by_agreement(tf.transpose(tf.cast(u, tf.float32), [1, 0, 2, 3]),
                                                    iterations, gradients)[0], tf.float64)
        v, grad = routed_and_gradient(ours, u_hat, weights)
        np.testing.assert_allclose(v, expected, rtol=2e-5, atol=1e-6)
        if gradients == "all" or iterations == 1:  # with one iteration there is no agreement update
            np.testing.assert_allclose(grad, expected_grad, rtol=1e-4, atol=1e-5)
        else:  # the shortcut drops the agreement updates' share of the gradient
            assert np.max(np.abs(grad - expected_grad)) > 100 * 1e-5


def test_routing_gradients_setting_reaches_the_model():
    cfg = ModelConfig(input_size=28, conv1_filters=16, primary_caps_types=4, routing_gradients="final")
    model = build_model(cfg)
    assert model.digit.routing_gradients == "final"
    with pytest.raises(ValueError, match="gradients='some'"):
        route_by_agreement(random_u_hat(), 3, "some")


@pytest.mark.parametrize("iterations", [1, 3])
@pytest.mark.parametrize("in_tf_function", [False, True], ids=["eager", "tf.function"])
def test_xla_and_plain_graph_give_the_same_outputs_and_gradients(iterations, in_tf_function):
    # Training differentiates inside a tf.function: TensorFlow's graph path for the compiled
    # part's gradient, not the eager one.
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
        results.append((tf.function(outputs_and_gradients) if in_tf_function else outputs_and_gradients)())
    (out_xla, grads_xla), (out_plain, grads_plain) = results
    for key in out_plain:
        np.testing.assert_allclose(out_xla[key], out_plain[key], atol=1e-5)
    assert_gradients_close(model.trainable_variables, grads_xla, grads_plain)


def assert_gradients_close(variables, ours, theirs):
    """Variable by variable, relative to each gradient's size: the convolutions' are ~1e-7 in
    these small models, under any fixed atol."""
    assert len(ours) == len(theirs) == len(variables)
    for variable, mine, reference in zip(variables, ours, theirs):
        scale = float(tf.reduce_max(tf.abs(reference)))
        assert scale > 0, variable.path
        np.testing.assert_allclose(mine, reference, atol=1e-4 * scale, err_msg=variable.path)



@pytest.mark.parametrize("settings", [
    {},
    {"routing_gradients": "final"},
    {"decoder": False},
    {"input_size": 36, "digits_per_image": 2},
], ids=["paper", "final-routing-gradients", "no-decoder", "multimnist"])
def test_compiled_training_gradients_equal_the_tapes_through_the_model(settings):
    # With jit_routing, CapsNet.losses_and_gradients compiles everything after the convolutions,
    # forward and backward, and chains its gradient into the convolutions' by hand: it must give
    # what a tape around the whole model gives in plain graph mode, variable by variable.
    cfg = ModelConfig(**{"input_size": 28, "conv1_filters": 16, "primary_caps_types": 4, **settings})
    model = build_model(cfg)
    size, k = cfg.input_size, cfg.digits_per_image
    labels = tf.reshape(tf.range(8 * k) % 10, [8, k]) if k > 1 else tf.range(8) % 10
    batch = {"image": tf.random.uniform([8, size, size, 1], seed=6), "label": labels}
    if k > 1:
        batch["components"] = tf.random.uniform([8, k, size, size, 1], seed=7)
    results = []
    for jit in (True, False):
        model.jit_routing = jit
        results.append(tf.function(lambda: model.losses_and_gradients(batch, tf.constant(0.25)))())
    compiled, taped = results
    for ours, theirs in zip(tf.nest.flatten(compiled[:2]), tf.nest.flatten(taped[:2])):
        np.testing.assert_allclose(ours, theirs, atol=1e-5)
    assert_gradients_close(model.trainable_variables, compiled[2], taped[2])

def test_parameter_counts_match_the_paper():
    # No bias on DigitCaps (the paper's equations have none): 8,215,568 at 28x28.
    assert build_model(ModelConfig(input_size=28)).count_params() == 8_215_568
    assert build_model(ModelConfig(input_size=28, decoder=False)).count_params() == 6_804_224
    assert build_model(ModelConfig(input_size=36, digits_per_image=2)).count_params() == 11_361_808
    assert round(build_model(ModelConfig(kind="baseline")).count_params() / 1e6, 1) == 35.4


# ------------------------------------------------ the authors' code, where it differs from the text

def test_the_authors_margin_loss_balance_is_half_the_class_mean_of_their_per_class_cost():
    """Their models/layers/layers.py `_margin_loss` on lengths - 0.5 with margin 0.4: per class
    0.5 * present + 0.5 * 0.5 * absent, then `evaluate` averages over batch and classes."""
    lengths = np.array([[0.95, 0.3, 0.05, 0.6, 0.1, 0.2, 0.9, 0.0, 0.45, 0.15],
                        [0.5, 0.8, 0.2, 0.0, 0.3, 0.7, 0.12, 0.05, 0.6, 0.99]], np.float32)
    targets = np.eye(10, dtype=np.float32)[[0, 1]] + np.eye(10, dtype=np.float32)[[0, 2]] * [[0], [1]]
    logits = lengths - 0.5
    positive = targets * (logits < 0.4) * (logits - 0.4) ** 2
    negative = (1 - targets) * (logits > -0.4) * (logits + 0.4) ** 2
    theirs = np.mean(0.5 * positive + 0.5 * 0.5 * negative, axis=1)  # per example; the batch mean follows
    model = build_model(ModelConfig(input_size=28, digits_per_image=2, conv1_filters=8,
                                    primary_caps_types=2, decoder=False, margin_loss_scale=0.05))
    ours = model.per_example_losses({"probabilities": tf.constant(lengths)},  # labels as MultiMNIST's pairs
                                    {"label": tf.constant([[0, 0], [1, 2]])})["loss"]
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)


def squash_np(s):
    norm = np.linalg.norm(s, axis=-1, keepdims=True)
    return norm ** 2 / (1 + norm ** 2) * s / norm


def test_capsule_biases_are_added_to_each_parents_input_before_every_squash():
    """Procedure 1 with the authors' bias on s_j (their `_update_routing`), in numpy."""
    from capstf.layers import DigitCapsules
    rng = np.random.default_rng(0)
    u = rng.normal(0, 0.3, [2, 12, 8]).astype(np.float32)  # [batch, in_caps, in_dim]
    layer = DigitCapsules(3, 4, routing_iters=3, use_bias=True)
    layer.build(u.shape)
    np.testing.assert_array_equal(layer.bias.numpy(), np.float32(0.1))  # where theirs starts
    layer.bias.assign(rng.normal(0, 0.5, [3, 4]))
    w, bias = layer.w.numpy().reshape(12, 8, 3, 4), layer.bias.numpy()
    u_hat = np.einsum("bid,idjk->bijk", u, w)  # [batch, in_caps, out_caps, dim]
    logits = np.zeros(u_hat.shape[:3])
    for _ in range(3):
        c = np.exp(logits) / np.exp(logits).sum(axis=2, keepdims=True)  # softmax over the parents
        v = squash_np(np.einsum("bij,bijk->bjk", c, u_hat) + bias)
        logits = logits + np.einsum("bijk,bjk->bij", u_hat, v)
    np.testing.assert_allclose(layer(tf.constant(u)).numpy(), v, rtol=1e-4, atol=1e-6)


def test_one_input_routing_primary_capsules_are_the_convolution_over_the_types_plus_a_bias():
    """The authors' PrimaryCaps: one routing iteration from one input capsule, so a uniform
    coupling 1/types on the convolution (no convolution bias), then their [types, dim] bias."""
    from capstf.layers import PrimaryCapsules
    rng = np.random.default_rng(1)
    features = rng.random([2, 11, 11, 5]).astype(np.float32)
    layer = PrimaryCapsules(types=4, dim=3, kernel_size=3, strides=2, one_input_routing=True)
    layer.build(features.shape)
    assert sorted(tuple(w.shape) for w in layer.trainable_weights) == [(3, 3, 5, 12), (4, 3)]  # no conv bias
    layer.bias.assign(rng.normal(0, 0.5, [4, 3]))
    conv = tf.nn.conv2d(features, layer.conv.kernel, 2, "VALID").numpy()  # [2, 5, 5, 4 types x 3 dims]
    expected = squash_np(conv.reshape(2, 25, 4, 3) / 4 + layer.bias.numpy()).reshape(2, 100, 3)
    np.testing.assert_allclose(layer(tf.constant(features)).numpy(), expected, rtol=1e-4, atol=1e-6)

    # Under bfloat16 convolutions (the default on CPUs with AVX512-BF16) the bias stays float32,
    # added to the float32 capsules: the same capsules, to bfloat16's rounding of the convolution.
    mixed = PrimaryCapsules(types=4, dim=3, kernel_size=3, strides=2, one_input_routing=True, dtype="mixed_bfloat16")
    mixed.build(features.shape)
    mixed.set_weights(layer.get_weights())
    capsules = mixed(tf.constant(features))
    assert capsules.dtype == tf.float32
    np.testing.assert_allclose(capsules.numpy(), expected, atol=0.02)


def test_capsule_biases_add_160_parameters_and_the_authors_decoder_starts_where_theirs_does():
    model = build_model(ModelConfig(input_size=28, capsule_biases=True, decoder_init="truncated-normal-0.1"))
    assert model.count_params() == 8_215_568 + 10 * 16 + 32 * 8 - 256  # PrimaryCaps' bias replaces the conv's
    for layer in model.decoder.layers:
        kernel = layer.kernel.numpy()
        assert abs(kernel.std() - 0.088) < 0.005 and np.abs(kernel).max() <= 0.2  # truncated at 2 stddev
        np.testing.assert_array_equal(layer.bias.numpy(), np.float32(0.1))
    plain = build_model(ModelConfig(input_size=28, conv1_filters=8, primary_caps_types=2))
    assert all(np.all(layer.bias.numpy() == 0) for layer in plain.decoder.layers)


def test_the_authors_decoder_initialization_follows_train_seed():
    cfg = ModelConfig(input_size=28, conv1_filters=8, primary_caps_types=2, decoder_init="truncated-normal-0.1")
    kernels = []  # the decoder's layers, built after keras.utils.set_random_seed, as build_state does
    for seed in (0, 0, 1):
        keras.utils.set_random_seed(seed)
        kernels.append([layer.kernel.numpy() for layer in build_model(cfg).decoder.layers])
    for same, other in zip(kernels[1], kernels[0]):
        np.testing.assert_array_equal(same, other)  # the same seed, the same decoder
    assert not np.allclose(kernels[0][0], kernels[2][0])  # another seed, another decoder
    first, second = (kernels[0][i].ravel()[:512] for i in (0, 1))
    assert not np.allclose(first, second)  # and each layer its own draws


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
    from capstf.layers import conv2d_valid
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


@pytest.mark.parametrize("stride,size,kernel_size", [(1, 13, 9), (2, 13, 9), (2, 14, 9), (2, 20, 9), (3, 16, 5)])
def test_the_input_gradient_by_phases_equals_tensorflows_own(stride, size, kernel_size):
    from capstf.layers import input_gradient_by_phases
    x = tf.random.normal([2, size, size, 16], seed=6)
    kernel = tf.random.normal([kernel_size, kernel_size, 16, 4], seed=7)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = tf.nn.conv2d(x, kernel, stride, "VALID")
    dy = tf.random.normal(y.shape, seed=8)
    np.testing.assert_allclose(input_gradient_by_phases(dy, kernel, stride, size, size),
                               tape.gradient(y, x, output_gradients=dy), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("amx,dtype,by_phases", [(True, tf.bfloat16, True), (False, tf.bfloat16, False),
                                                 (True, tf.float32, False)])
def test_the_input_gradient_goes_by_phases_in_bfloat16_on_amx_cpus_only(monkeypatch, amx, dtype, by_phases):
    import capstf.cpu
    import capstf.layers as layers
    phase_calls, by_phases_of = [], layers.input_gradient_by_phases
    monkeypatch.setattr(capstf.cpu, "flags", lambda: frozenset({"avx2", "avx512f", "avx512_bf16", "amx_bf16"}
                                                               if amx else {"avx2", "avx512f", "avx512_bf16"}))
    monkeypatch.setattr(layers, "input_gradient_by_phases", lambda *args: phase_calls.append(args) or by_phases_of(*args))
    x = tf.random.normal([2, 20, 20, 16], seed=6)
    kernel = tf.random.normal([9, 9, 16, 4], seed=7)
    dy = tf.random.normal([2, 6, 6, 4], seed=8)
    grads = []
    for conv, cast in ((layers.conv2d_valid, lambda t: tf.cast(t, dtype)), (tf.nn.conv2d, tf.identity)):
        x_in = cast(x)
        with tf.GradientTape() as tape:
            tape.watch(x_in)
            y = conv(x_in, cast(kernel), 2) if conv is layers.conv2d_valid else conv(x_in, kernel, 2, "VALID")
        grads.append(tf.cast(tape.gradient(y, x_in, output_gradients=cast(dy)), tf.float32).numpy())
    assert len(phase_calls) == int(by_phases)
    ours, tensorflows = grads
    np.testing.assert_allclose(ours, tensorflows, atol=0.02 * np.abs(tensorflows).max())  # bfloat16: 8 bits


@pytest.mark.parametrize("forward_gradients", [True, False])
def test_gpu_models_keep_tensorflows_convolution_gradients(forward_gradients):
    model = build_model(ModelConfig(input_size=28, conv1_filters=16, primary_caps_types=4),
                        forward_conv_gradients=forward_gradients)

    @tf.function
    def gradients(images):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(model(images)["probabilities"])
        return tape.gradient(loss, model.trainable_variables)

    graph = gradients.get_concrete_function(tf.TensorSpec([2, 28, 28, 1])).graph
    backprop_input = sum(op.type == "Conv2DBackpropInput" for op in graph.get_operations())
    # Conv1 (one input channel) always keeps TF's gradients; PrimaryCaps' input gradient is TF's
    # own kernel or, on CPUs, a forward Conv2D.
    assert backprop_input == (1 if forward_gradients else 2)


def test_multimnist_reconstruction_k_is_scored_against_component_k_of_label_k():
    model = build_model(ModelConfig(input_size=36, digits_per_image=2, conv1_filters=16, primary_caps_types=4,
                                    reconstruction_weight=1.0))
    images = tf.random.uniform([2, 36, 36, 1], seed=8)
    components = tf.random.uniform([2, 2, 36, 36, 1], seed=9)
    labels = tf.constant([[3, 7], [5, 1]])
    out = model(images, labels=labels)
    for k in range(2):  # reconstruction k is decoded from the capsule of label k alone
        np.testing.assert_allclose(out["reconstructions"][:, k],
                                   model.reconstruct(out["capsules"], labels[:, k:k + 1])[:, 0], atol=1e-6)
    loss = model.per_example_losses(out, {"image": images, "label": labels, "components": components})
    by_hand = tf.reduce_sum(tf.square(out["reconstructions"] - components), axis=[1, 2, 3, 4])
    np.testing.assert_allclose(loss["reconstruction_loss"], by_hand, rtol=1e-5)
    # Two clearly different reconstructions: the loss is 0 against the components in their order only.
    distinct = tf.stack([tf.zeros([2, 36, 36, 1]), tf.ones([2, 36, 36, 1])], axis=1)
    for order, expected in ((slice(None), 0.0), (slice(None, None, -1), 2 * 36 * 36)):
        loss = model.per_example_losses({**out, "reconstructions": distinct},
                                        {"image": images, "label": labels, "components": distinct[:, order]})
        np.testing.assert_allclose(loss["reconstruction_loss"], expected)


def test_exact_match_needs_both_digits_in_either_order():
    from capstf.metrics import exact_match
    probabilities = tf.constant([[0.1, 0.9, 0.2, 0.8], [0.1, 0.9, 0.2, 0.8], [0.1, 0.9, 0.2, 0.8]])
    labels = tf.constant([[1, 3], [3, 1], [1, 2]])
    assert exact_match(probabilities, labels).numpy().tolist() == [True, True, False]
    assert exact_match(probabilities[:1], tf.constant([1])).numpy().tolist() == [True]
    assert exact_match(probabilities[:1], tf.constant([3])).numpy().tolist() == [False]


def test_none_of_the_above_routing_follows_the_papers_rule_on_a_hand_computed_case():
    u_hat = tf.constant([[[[1.0], [0.5]]]])  # [in_caps 1, batch 1, parents 2, dim 1]
    # Iteration 1: c = 1/3 for each parent (the extra zero logit takes the third share);
    # s = (1/3, 1/6); v = squash(s) = (0.1, 1/37) in one dimension; b = u_hat . v = (0.1, 0.5/37).
    b = np.array([0.1, 0.5 / 37])
    expected_c = np.exp(b) / (1 + np.exp(b).sum())  # softmax over (b_1, b_2, 0), the 0 dropped
    s = expected_c * np.array([1.0, 0.5])
    expected_v = s ** 2 / (1 + s ** 2) * np.sign(s)
    v, c = route_by_agreement(u_hat, 2, none_of_the_above=True)
    np.testing.assert_allclose(c[0, 0], expected_c, rtol=1e-6)
    np.testing.assert_allclose(v[0, :, 0], expected_v, rtol=1e-4)
    _, c = route_by_agreement(random_u_hat(), 3, none_of_the_above=True)
    sums = tf.reduce_sum(c, axis=-1).numpy()
    assert np.all(sums < 1) and np.all(sums > 0.5)
    _, plain = route_by_agreement(random_u_hat(), 3)
    np.testing.assert_allclose(tf.reduce_sum(plain, axis=-1), 1.0, atol=1e-6)
