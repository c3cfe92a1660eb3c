"""CapsNet: Conv1 -> PrimaryCaps -> DigitCaps (routing by agreement) -> lengths, + decoder.

The paper's MNIST model has 8,215,568 parameters (no DigitCaps bias; 6,804,224 without the
decoder); on 36x36 MultiMNIST inputs it has 11,361,808.
"""
import tensorflow as tf
from tensorflow import keras

from capstf.model import losses
from capstf.model.routing import capsule_length, route_by_agreement, squash

KERNEL = 9  # both convolutions, as in the paper
MIN_CHANNELS_FOR_CONV_GRADIENTS = 16


def conv2d_valid(x, kernel, stride):
    """A VALID convolution whose two gradients are computed as forward convolutions.

    Each gradient is a correlation that a forward convolution can do once the right axis plays
    the batch: for the kernel gradient, the input channels (the input correlated with the output
    gradient, dilated by the stride); for the input gradient, again the input channels (the
    kernel, zero-padded, correlated with the flipped output gradient, dilated by the stride).
    On this project's AVX512 CPUs oneDNN ran these faster than TF's gradient kernels (PrimaryCaps,
    batch 128, float32 / bfloat16): kernel gradient 233 vs 360 ms / 121 vs 272 ms; input gradient
    252 vs 305 ms / 126 vs 135 ms. Inputs with few channels (Conv1's image) keep TF's gradients:
    one channel is too small a batch (2x slower, measured).
    """
    if x.shape[-1] < MIN_CHANNELS_FOR_CONV_GRADIENTS:
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
            # d/dx: [in_ch, kh, kw, out_ch] (padded) * [out_h, out_w, out_ch, batch] (flipped)
            pad = [[0, 0], [stride * (out_h - 1), in_h - kh], [stride * (out_w - 1), in_w - kw], [0, 0]]
            dx = tf.nn.conv2d(tf.transpose(kernel, [2, 0, 1, 3]), tf.transpose(tf.reverse(dy, [1, 2]), [1, 2, 3, 0]),
                              1, pad, dilations=stride)  # [in_ch, in_h, in_w, batch]
            return tf.transpose(dx, [3, 1, 2, 0]), tf.transpose(dk, [1, 2, 0, 3])
        return tf.nn.conv2d(x, kernel, stride, "VALID"), grad
    return conv(x, kernel)


class Conv(keras.layers.Layer):
    """A 9x9 VALID convolution with bias and optional ReLU, using `conv2d_valid`.

    Args:
      filters: output channels.
      stride: 1 (Conv1) or 2 (PrimaryCaps).
      relu: apply ReLU.
      dtype: a dtype policy; "mixed_bfloat16" keeps float32 weights and computes in bfloat16.
    """

    def __init__(self, filters, stride=1, relu=False, **kwargs):
        super().__init__(**kwargs)
        self.filters, self.stride, self.relu = filters, stride, relu

    def build(self, input_shape):
        self.kernel = self.add_weight(name="kernel", shape=(KERNEL, KERNEL, input_shape[-1], self.filters),
                                      initializer="glorot_uniform")
        self.bias = self.add_weight(name="bias", shape=(self.filters,), initializer="zeros")

    def call(self, x):
        dtype = self.compute_dtype
        y = conv2d_valid(tf.cast(x, dtype), tf.cast(self.kernel, dtype), self.stride) + tf.cast(self.bias, dtype)
        return tf.nn.relu(y) if self.relu else y

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "stride": self.stride, "relu": self.relu}


class PrimaryCapsules(keras.layers.Layer):
    """A strided convolution whose channels are grouped into capsules, then squashed.

    Args:
      types: capsule types (32 in the paper); each spatial position holds one of each.
      dim: capsule dimension (8).
      conv_dtype: dtype policy of the convolution ("mixed_bfloat16" computes it in bfloat16);
        the capsules themselves are always float32.
    """

    def __init__(self, types=32, dim=8, conv_dtype="float32", **kwargs):
        super().__init__(**kwargs)
        self.types, self.dim, self.conv_dtype = types, dim, conv_dtype
        self.conv = Conv(types * dim, stride=2, dtype=conv_dtype, name="conv")

    def call(self, features):
        x = tf.cast(self.conv(features), tf.float32)  # [batch, g, g, types * dim]
        grid = x.shape[1] * x.shape[2] * self.types
        return squash(tf.reshape(x, [-1, grid, self.dim]))  # [batch, in_caps, dim]

    def get_config(self):
        return {**super().get_config(), "types": self.types, "dim": self.dim,
                "conv_dtype": self.conv_dtype}


class DigitCapsules(keras.layers.Layer):
    """One capsule per class; each input capsule i predicts each class j with its own W_ij.

    Args:
      num_classes: parent capsules (10).
      dim: parent capsule dimension (16).
      routing_iters: routing iterations r.
    """

    def __init__(self, num_classes=10, dim=16, routing_iters=3, **kwargs):
        super().__init__(**kwargs)
        self.num_classes, self.dim, self.routing_iters = num_classes, dim, routing_iters

    def build(self, input_shape):
        in_caps, in_dim = input_shape[1], input_shape[2]
        # W_ij for all i as one [in_caps, in_dim, classes * dim] tensor: one batched matmul.
        self.w = self.add_weight(name="w", shape=(in_caps, in_dim, self.num_classes * self.dim),
                                 initializer=keras.initializers.RandomNormal(stddev=0.01))

    def call(self, u):
        u = tf.transpose(u, [1, 0, 2])  # [in_caps, batch, in_dim]
        u_hat = tf.matmul(u, self.w)  # [in_caps, batch, classes * dim]
        u_hat = tf.reshape(u_hat, [tf.shape(u)[0], tf.shape(u)[1], self.num_classes, self.dim])
        v, _ = route_by_agreement(u_hat, self.routing_iters)
        return v  # [batch, classes, dim]

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes, "dim": self.dim,
                "routing_iters": self.routing_iters}


def mask_capsules(capsules, classes):
    """For each class index, zeroes every capsule but that one and flattens.

    Args:
      capsules: [batch, num_classes, dim].
      classes: [batch, k] int class indices (the labels in training, the longest at test).
    Returns:
      [batch, k, num_classes * dim] decoder inputs, one per index.
    """
    keep = tf.one_hot(classes, capsules.shape[1], dtype=capsules.dtype)  # [batch, k, classes]
    masked = keep[..., None] * capsules[:, None]  # [batch, k, classes, dim]
    return tf.reshape(masked, [-1, classes.shape[1], capsules.shape[1] * capsules.shape[2]])


class CapsNet(keras.Model):
    """The paper's CapsNet, built from a ModelConfig.

    Args:
      cfg: ModelConfig (input size, channels, classes, capsule sizes, routing, decoder).
      jit_routing: compile routing with XLA, together with everything else after the two
        convolutions (DigitCaps, lengths, decoder): same numbers as plain graph mode; on CPU
        one XLA cluster made the batch-32 forward+backward of these parts 0.038 -> 0.026 s.
        The convolutions stay outside: XLA's CPU convolutions are many times slower.
      precision: "float32", or "mixed_bfloat16"/"mixed_float16" for the two convolutions
        (routing, squash, decoder and losses stay float32).
    """

    def __init__(self, cfg, jit_routing=True, precision="float32", **kwargs):
        super().__init__(**kwargs)
        self.cfg = cfg
        self.conv1 = Conv(cfg.conv1_filters, relu=True, dtype=precision, name="conv1")
        self.primary = PrimaryCapsules(cfg.primary_caps_types, cfg.primary_caps_dim,
                                       precision, name="primary_caps")
        self.digit = DigitCapsules(cfg.num_classes, cfg.digit_caps_dim, cfg.routing_iters, name="digit_caps")
        self.jit_routing = jit_routing
        self.decoder = None
        if cfg.decoder:
            pixels = cfg.input_size * cfg.input_size * cfg.channels
            self.decoder = keras.Sequential([
                keras.layers.Dense(512, activation="relu"),
                keras.layers.Dense(1024, activation="relu"),
                keras.layers.Dense(pixels, activation="sigmoid"),
            ], name="decoder")
        self(tf.zeros([1, cfg.input_size, cfg.input_size, cfg.channels]))  # creates the weights

    def call(self, images, labels=None, training=False):
        """images [batch, H, W, C] in [0, 1]; labels int [batch] or [batch, k] to mask with.

        Returns a dict: probabilities [batch, classes] (capsule lengths), capsules
        [batch, classes, dim], and with a decoder reconstructions [batch, k, H, W, C] (k =
        digits per image), decoded from the labelled capsules if labels are given, else from
        the k longest.
        """
        primary = self.primary(self.conv1(images))  # [batch, in_caps, in_dim]
        classes = None if labels is None else tf.reshape(labels, [tf.shape(labels)[0], -1])  # [batch, k]
        return (self.from_primary_capsules_xla if self.jit_routing else self.from_primary_capsules)(primary, classes)

    def from_primary_capsules(self, primary, classes=None):
        """Primary capsules -> the outputs of `call`; decodes `classes`, or the k longest."""
        capsules = self.digit(primary)  # [batch, classes, dim]
        lengths = capsule_length(capsules)  # [batch, classes]
        out = {"probabilities": lengths, "capsules": capsules}
        if self.decoder is not None:
            if classes is None:
                classes = tf.math.top_k(lengths, self.cfg.digits_per_image).indices
            out["reconstructions"] = self.reconstruct(capsules, classes)
        return out

    @tf.function(jit_compile=True, reduce_retracing=True)
    def from_primary_capsules_xla(self, primary, classes=None):
        return self.from_primary_capsules(primary, classes)

    def reconstruct(self, capsules, classes):
        """Decodes the capsules of `classes` [batch, k] -> images [batch, k, H, W, C]."""
        masked = mask_capsules(capsules, classes)
        pixels = self.decoder(tf.reshape(masked, [-1, masked.shape[-1]]))
        s, c = self.cfg.input_size, self.cfg.channels
        return tf.reshape(pixels, [-1, classes.shape[1], s, s, c])

    def per_example_losses(self, out, batch):
        """Margin (+ weighted reconstruction) loss per example, and its parts."""
        margin = losses.margin_loss(out["probabilities"], losses.multi_hot(batch["label"], self.cfg.num_classes))
        result = {"margin_loss": margin, "loss": margin}
        if self.decoder is not None:
            targets = batch.get("components", batch["image"][:, None])
            recon = losses.reconstruction_loss(out["reconstructions"], targets, self.cfg.reconstruction_weight)
            result.update(reconstruction_loss=recon, loss=margin + recon)
        return result
