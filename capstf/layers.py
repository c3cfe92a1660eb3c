"""Capsule layers for Keras models (Sabour, Frosst, Hinton 2017), and the math under them.

    images -> keras.layers.Conv2D(256, 9, activation="relu")
           -> PrimaryCapsules(32, 8)            # [batch, 1152, 8]
           -> DigitCapsules(10, 16)             # [batch, 10, 16], routing by agreement
           -> CapsuleLength()                   # [batch, 10], the class scores
    CapsuleMask()([capsules, labels]) -> a decoder's input (the labelled capsule, or the longest)

capstf's own CapsNet (capstf.model) is built from these same layers. They are registered with
`keras.saving`, so a model that uses them saves to `.keras` and loads wherever capstf is imported.
The capsule layers compute in float32 under any dtype policy (routing's softmax and squash lose
too much in 16 bits); PrimaryCapsules' convolution follows the policy (bfloat16 under
"mixed_bfloat16").
"""
import keras
import tensorflow as tf

from capstf import cpu
from capstf.config import ROUTING_GRADIENTS

MIN_CHANNELS_FOR_CONV_GRADIENTS = 16


# ------------------------------------------------------------------------------- the math

def squash(s, axis=-1, eps=1e-7):
    """Shrinks vectors to length |s|^2 / (1 + |s|^2), keeping their direction.

    `eps` inside the square root keeps value and gradient finite at s = 0.
    """
    norm2 = tf.reduce_sum(tf.square(s), axis=axis, keepdims=True)
    return norm2 / (1.0 + norm2) * s / tf.sqrt(norm2 + eps)


def capsule_length(v, eps=1e-7):
    """[..., dim] -> [...]: the vector lengths, with a finite gradient at v = 0."""
    return tf.sqrt(tf.reduce_sum(tf.square(v), axis=-1) + eps)


def route_by_agreement(u_hat, iterations: int, gradients: str = "all", none_of_the_above: bool = False,
                       bias=None):
    """Routes predictions from child capsules i to parent capsules j (the paper's Procedure 1).

    Args:
      u_hat: [in_caps, batch, out_caps, out_dim] predictions u_hat_{j|i} (in_caps first: the
        layout the prediction matmul produces).
      iterations: routing iterations r >= 1 (r = 1: uniform coupling).
      gradients: "all": gradients flow through every iteration, agreement updates included, as
        in Procedure 1 and the authors' code; "final": the agreement updates see u_hat as a
        constant and gradients flow through the last weighted sum only (a shortcut of many
        community implementations; cheaper backward).
      none_of_the_above: each input capsule's softmax over the parents gets one more logit,
        fixed at 0, dropped after the softmax: a child that agrees with no parent can send its
        vote nowhere (the paper's CIFAR10 model; its coupling coefficients then sum to < 1).
      bias: optional [out_caps, out_dim], added to every s_j before the squash, in every
        iteration (the authors' code, models/layers/layers.py `_update_routing`; the paper has none).
    Returns:
      v: [batch, out_caps, out_dim] parent capsules.
      c: [in_caps, batch, out_caps] the last coupling coefficients (sum to 1 over out_caps).
    """
    if gradients not in ROUTING_GRADIENTS:
        raise ValueError(f"gradients={gradients!r}: choose one of {ROUTING_GRADIENTS}")
    in_caps, batch, out_caps = tf.shape(u_hat)[0], tf.shape(u_hat)[1], u_hat.shape[2]
    # One transpose to [batch, out_caps, in_caps, dim] makes every weighted sum and agreement
    # below a batched matrix product over in_caps. With the forward and backward compiled
    # together (CapsNet.losses_and_gradients), a CPU training step ran 25% faster than with
    # einsums on the matmul's layout (docs/performance.md).
    u_hat = tf.transpose(u_hat, [1, 2, 0, 3])
    u_hat_agree = tf.stop_gradient(u_hat) if gradients == "final" else u_hat
    # Start from uniform coupling: softmax(zeros), without XLA constant-folding a softmax.
    c = tf.fill(tf.stack([batch, out_caps, in_caps]), 1.0 / (out_caps + int(none_of_the_above)))
    logits = None
    for i in range(iterations):
        last = i == iterations - 1
        s = tf.matmul(c[:, :, None], u_hat if last else u_hat_agree)[:, :, 0]  # [batch, out_caps, dim]
        if bias is not None:
            s = s + bias
        v = squash(s)
        if last:
            return v, tf.transpose(c, [2, 0, 1])
        agreement = tf.matmul(u_hat_agree, v[..., None])[..., 0]  # [batch, out_caps, in_caps]
        logits = agreement if logits is None else logits + agreement
        if none_of_the_above:
            c = tf.nn.softmax(tf.concat([logits, tf.zeros_like(logits[:, :1])], axis=1), axis=1)[:, :-1]
        else:
            c = tf.nn.softmax(logits, axis=1)


def conv2d_valid(x, kernel, stride, forward_gradients=True):
    """A VALID convolution whose two gradients are computed as forward convolutions.

    Each gradient is a correlation that a forward convolution can do once the right axis plays
    the batch: for the kernel gradient, the input channels (the input correlated with the output
    gradient, dilated by the stride); for the input gradient, again the input channels (the
    kernel, zero-padded, correlated with the flipped output gradient, dilated by the stride).
    On AVX512 CPUs oneDNN runs these faster than TF's gradient kernels, in float32 and bfloat16.
    On CPUs with AMX, oneDNN runs the dilated input gradient in bfloat16 without AMX, so there it
    is `input_gradient_by_phases` instead. Inputs with few channels (Conv1's image) keep TF's
    gradients: one channel is too small a batch. The timings behind each choice are in
    docs/performance.md. forward_gradients=False
    keeps TensorFlow's own gradients: capstf's training picks that on GPUs and on AVX2-only CPUs,
    where TF's were faster (`capstf.train.device_defaults`).
    """
    if not forward_gradients or x.shape[-1] < MIN_CHANNELS_FOR_CONV_GRADIENTS:
        return tf.nn.conv2d(x, kernel, stride, "VALID")

    @tf.custom_gradient
    def conv(x, kernel):
        def grad(dy):
            kh, kw = kernel.shape[:2]
            out_h, out_w = dy.shape[1:3]
            in_h, in_w = x.shape[1:3]
            # d/dkernel: [in_ch, used_h, used_w, batch] * [out_h, out_w, batch, out_ch]
            used_h, used_w = stride * (out_h - 1) + kh, stride * (out_w - 1) + kw
            dk = tf.nn.conv2d(tf.transpose(x[:, :used_h, :used_w], [3, 1, 2, 0]), tf.transpose(dy, [1, 2, 0, 3]),
                              1, "VALID", dilations=stride)  # [in_ch, kh, kw, out_ch]
            if dy.dtype == tf.bfloat16 and min(kh, kw) >= stride and cpu.has("amx_bf16"):
                dx = input_gradient_by_phases(dy, kernel, stride, in_h, in_w)
            else:
                # d/dx: [in_ch, kh, kw, out_ch] (padded) * [out_h, out_w, out_ch, batch] (flipped)
                pad = [[0, 0], [stride * (out_h - 1), in_h - kh], [stride * (out_w - 1), in_w - kw], [0, 0]]
                dx = tf.transpose(tf.nn.conv2d(
                    tf.transpose(kernel, [2, 0, 1, 3]), tf.transpose(tf.reverse(dy, [1, 2]), [1, 2, 3, 0]),
                    1, pad, dilations=stride), [3, 1, 2, 0])  # [in_ch, in_h, in_w, batch] -> [batch, ..., in_ch]
            return dx, tf.transpose(dk, [1, 2, 0, 3])
        return tf.nn.conv2d(x, kernel, stride, "VALID"), grad
    return conv(x, kernel)


def input_gradient_by_phases(dy, kernel, stride, in_h, in_w):
    """d/dx of a VALID convolution with this stride, as stride^2 stride-1 convolutions of dy.

    Input row stride * p + r meets only kernel rows r, r + stride, ...: the rows of phase r are
    dy fully correlated with those kernel rows, flipped; likewise the columns. The phases are
    then interleaved. Each convolution is a plain one, which oneDNN runs in AMX tiles.
    """
    kh, kw = kernel.shape[:2]
    rows, cols = -(-in_h // stride), -(-in_w // stride)  # of phase 0, the largest; crop at the end
    swapped = tf.transpose(kernel, [0, 1, 3, 2])  # [kh, kw, out_ch, in_ch]
    phases = []  # [stride rows][stride cols] of [batch, rows, cols, in_ch]
    for r in range(stride):
        phases.append([])
        # Gathers, flipping as they pick: strided slices of a bfloat16 kernel were 5x slower here.
        kernel_rows = tf.gather(swapped, list(range(r, kh, stride))[::-1], axis=0)
        for c in range(stride):
            k = tf.gather(kernel_rows, list(range(c, kw, stride))[::-1], axis=1)  # [kh', kw', out_ch, in_ch]
            pad_h, pad_w = k.shape[0] - 1, k.shape[1] - 1
            full = tf.nn.conv2d(dy, k, 1, [[0, 0], [pad_h, pad_h], [pad_w, pad_w], [0, 0]])[:, :rows, :cols]
            phases[r].append(tf.pad(full, [[0, 0], [0, rows - full.shape[1]], [0, cols - full.shape[2]], [0, 0]]))
    interleaved = tf.stack([tf.stack(row, axis=3) for row in phases], axis=2)  # [batch, rows, r, cols, c, in_ch]
    return tf.reshape(interleaved, [-1, rows * stride, cols * stride, kernel.shape[2]])[:, :in_h, :in_w]


def _positive(**values):
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


# ------------------------------------------------------------------------------ the layers

@keras.saving.register_keras_serializable(package="capstf")
class Conv(keras.layers.Layer):
    """A square VALID convolution with bias and optional ReLU, using `conv2d_valid`.

    Args:
      filters: output channels.
      kernel_size: height and width of the kernel.
      strides: the stride on both axes.
      relu: apply ReLU.
      forward_gradients: compute the gradients as forward convolutions (see `conv2d_valid`).
      use_bias: add a learned bias per output channel.

    Input shape: [batch, H, W, C]. Output shape: [batch, (H - kernel_size) // strides + 1, ..., filters].
    """

    def __init__(self, filters, kernel_size=9, strides=1, relu=False, forward_gradients=True, use_bias=True,
                 **kwargs):
        super().__init__(**kwargs)
        _positive(filters=filters, kernel_size=kernel_size, strides=strides)
        self.filters, self.kernel_size, self.strides, self.relu = filters, kernel_size, strides, relu
        self.forward_gradients, self.use_bias = forward_gradients, use_bias

    def build(self, input_shape):
        self.kernel = self.add_weight(name="kernel", initializer="glorot_uniform",
                                      shape=(self.kernel_size, self.kernel_size, input_shape[-1], self.filters))
        if self.use_bias:
            self.bias = self.add_weight(name="bias", shape=(self.filters,), initializer="zeros")

    def call(self, x):
        dtype = self.compute_dtype
        y = conv2d_valid(tf.cast(x, dtype), tf.cast(self.kernel, dtype), self.strides, self.forward_gradients)
        if self.use_bias:
            y = y + tf.cast(self.bias, dtype)
        return tf.nn.relu(y) if self.relu else y

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "kernel_size": self.kernel_size,
                "strides": self.strides, "relu": self.relu, "forward_gradients": self.forward_gradients,
                "use_bias": self.use_bias}


@keras.saving.register_keras_serializable(package="capstf")
class PrimaryCapsules(keras.layers.Layer):
    """A strided convolution whose channels are grouped into capsules, then squashed.

    Args:
      types: capsule types (32 in the paper); each position of the output grid holds one of each.
      dim: capsule dimension (8).
      kernel_size, strides: of the convolution (9 and 2 in the paper).
      forward_conv_gradients: see `conv2d_valid` (fast on AVX-512 CPUs; False on GPUs).
      one_input_routing: as the authors' code builds it (models/capsule_model.py: a convolutional
        capsule layer with one routing iteration from a single input capsule): the convolution
        times the uniform coupling 1 / types, plus a bias [types, dim] starting at 0.1, then
        squashed. False: the convolution with its own bias, squashed (the paper's text).

    Input shape: [batch, H, W, C] features. Output shape: [batch, grid_h * grid_w * types, dim],
    float32 (the convolution itself computes in the layer's dtype policy).
    """

    def __init__(self, types, dim, kernel_size=9, strides=2, forward_conv_gradients=True, one_input_routing=False,
                 **kwargs):
        super().__init__(**kwargs)
        _positive(types=types, dim=dim)
        self.types, self.dim, self.kernel_size, self.strides = types, dim, kernel_size, strides
        self.forward_conv_gradients, self.one_input_routing = forward_conv_gradients, one_input_routing
        self.conv = Conv(types * dim, kernel_size, strides, forward_gradients=forward_conv_gradients,
                         use_bias=not one_input_routing, dtype=self.dtype_policy, name="conv")

    def build(self, input_shape):
        self.conv.build(input_shape)
        if self.one_input_routing:
            # autocast=False: under a mixed policy Keras would read it in the convolution's
            # bfloat16 or float16, but it is added to the float32 capsules.
            self.bias = self.add_weight(name="bias", shape=(self.types, self.dim), dtype="float32", autocast=False,
                                        initializer=keras.initializers.Constant(0.1))

    def call(self, features):
        x = tf.cast(self.conv(features), tf.float32)  # [batch, grid_h, grid_w, types * dim]
        in_caps = x.shape[1] * x.shape[2] * self.types
        if self.one_input_routing:
            grid = x.shape[1] * x.shape[2]
            x = tf.reshape(x, [-1, grid, self.types, self.dim]) / self.types + self.bias
        return squash(tf.reshape(x, [-1, in_caps, self.dim]))  # [batch, in_caps, dim]

    def compute_output_shape(self, input_shape):
        grid = [(n - self.kernel_size) // self.strides + 1 for n in input_shape[1:3]]
        return (input_shape[0], grid[0] * grid[1] * self.types, self.dim)

    def get_config(self):
        return {**super().get_config(), "types": self.types, "dim": self.dim, "kernel_size": self.kernel_size,
                "strides": self.strides, "forward_conv_gradients": self.forward_conv_gradients,
                "one_input_routing": self.one_input_routing}


@keras.saving.register_keras_serializable(package="capstf")
class DigitCapsules(keras.layers.Layer):
    """One capsule per class; each input capsule i predicts each capsule j with its own W_ij,
    and routing by agreement weighs the predictions.

    Args:
      num_capsules: parent capsules (10: one per class).
      dim: parent capsule dimension (16).
      routing_iters: routing iterations r (3 in the paper).
      routing_gradients: "all" (Procedure 1) or "final" (see `route_by_agreement`).
      none_of_the_above: an extra, dropped parent in the routing softmax (see `route_by_agreement`).
      use_bias: a learned bias [num_capsules, dim], starting at 0.1, added to each s_j before the
        squash (the authors' code; the paper has none).

    Input shape: [batch, in_caps, in_dim] (in_caps fixed). Output shape: [batch, num_capsules, dim].
    """

    def __init__(self, num_capsules, dim, routing_iters=3, routing_gradients="all", none_of_the_above=False,
                 use_bias=False, **kwargs):
        kwargs["dtype"] = kwargs.get("dtype") or "float32"  # routing in float32 under mixed precision
        super().__init__(**kwargs)
        _positive(num_capsules=num_capsules, dim=dim, routing_iters=routing_iters)
        if routing_gradients not in ROUTING_GRADIENTS:
            raise ValueError(f"routing_gradients={routing_gradients!r}: choose one of {ROUTING_GRADIENTS}")
        self.num_capsules, self.dim, self.routing_iters = num_capsules, dim, routing_iters
        self.routing_gradients, self.none_of_the_above = routing_gradients, none_of_the_above
        self.use_bias = use_bias

    def build(self, input_shape):
        in_caps, in_dim = input_shape[1], input_shape[2]
        # W_ij for all i as one [in_caps, in_dim, num_capsules * dim] tensor: one batched matmul.
        self.w = self.add_weight(name="w", shape=(in_caps, in_dim, self.num_capsules * self.dim),
                                 initializer=keras.initializers.RandomNormal(stddev=0.01))
        self.bias = self.add_weight(name="bias", shape=(self.num_capsules, self.dim),
                                    initializer=keras.initializers.Constant(0.1)) if self.use_bias else None

    def call(self, u):
        u = tf.transpose(tf.cast(u, tf.float32), [1, 0, 2])  # [in_caps, batch, in_dim]
        u_hat = tf.matmul(u, self.w)  # [in_caps, batch, num_capsules * dim]
        u_hat = tf.reshape(u_hat, [tf.shape(u)[0], tf.shape(u)[1], self.num_capsules, self.dim])
        v, _ = route_by_agreement(u_hat, self.routing_iters, self.routing_gradients, self.none_of_the_above,
                                  self.bias)
        return v  # [batch, num_capsules, dim]

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.num_capsules, self.dim)

    def get_config(self):
        return {**super().get_config(), "num_capsules": self.num_capsules, "dim": self.dim,
                "routing_iters": self.routing_iters, "routing_gradients": self.routing_gradients,
                "none_of_the_above": self.none_of_the_above, "use_bias": self.use_bias}


@keras.saving.register_keras_serializable(package="capstf")
class CapsuleLength(keras.layers.Layer):
    """The length of each capsule: the probability that its entity is present.

    Input shape: [batch, num_capsules, dim]. Output shape: [batch, num_capsules].
    """

    def __init__(self, **kwargs):
        kwargs["dtype"] = kwargs.get("dtype") or "float32"
        super().__init__(**kwargs)

    def call(self, capsules):
        return capsule_length(tf.cast(capsules, tf.float32))

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1])


def mask_capsules(capsules, classes):
    """For each class index, zeroes every capsule but that one and flattens.

    Args:
      capsules: [batch, num_capsules, dim].
      classes: [batch, k] int class indices (the labels in training, the longest at test).
    Returns:
      [batch, k, num_capsules * dim] decoder inputs, one per index.
    """
    keep = tf.one_hot(classes, capsules.shape[1], dtype=capsules.dtype)  # [batch, k, num_capsules]
    masked = keep[..., None] * capsules[:, None]  # [batch, k, num_capsules, dim]
    k = classes.shape[1] if classes.shape[1] is not None else tf.shape(classes)[1]
    return tf.reshape(masked, [-1, k, capsules.shape[1] * capsules.shape[2]])


@keras.saving.register_keras_serializable(package="capstf")
class CapsuleMask(keras.layers.Layer):
    """Keeps one capsule (or `count`) and zeroes the rest: what the reconstruction decoder reads.

    Called on `[capsules, classes]` it keeps the given classes (training: the labels); called on
    `capsules` alone it keeps the `count` longest (inference).

    Args:
      count: capsules kept when no classes are given (2 for MultiMNIST).

    Input shape: [batch, num_capsules, dim], and optionally int classes [batch] or [batch, k].
    Output shape: [batch, num_capsules * dim] for one class per example, else
    [batch, k, num_capsules * dim].
    """

    def __init__(self, count=1, **kwargs):
        kwargs["dtype"] = kwargs.get("dtype") or "float32"
        super().__init__(**kwargs)
        _positive(count=count)
        self.count = count

    def call(self, inputs):
        if isinstance(inputs, (list, tuple)):
            capsules, classes = inputs
            classes = tf.cast(classes, tf.int32)
            single = classes.shape.rank == 1
            classes = classes[:, None] if single else classes
        else:
            capsules, single = inputs, self.count == 1
            classes = tf.math.top_k(capsule_length(capsules), self.count).indices
        masked = mask_capsules(tf.cast(capsules, tf.float32), classes)  # [batch, k, num_capsules * dim]
        return masked[:, 0] if single else masked

    def compute_output_shape(self, input_shape):
        capsules, classes = input_shape if isinstance(input_shape, (list, tuple)) and \
            isinstance(input_shape[0], (list, tuple)) else (input_shape, None)
        flat = capsules[1] * capsules[2]
        if classes is None:
            return (capsules[0], flat) if self.count == 1 else (capsules[0], self.count, flat)
        return (capsules[0], flat) if len(classes) == 1 else (capsules[0], classes[1], flat)

    def get_config(self):
        return {**super().get_config(), "count": self.count}
