"""CapsNet: Conv1 -> PrimaryCaps -> DigitCaps (routing by agreement) -> lengths, + decoder.

The paper's MNIST model has 8,215,568 parameters (no DigitCaps bias; 6,804,224 without the
decoder); on 36x36 MultiMNIST inputs it has 11,361,808. With the authors' capsule biases
(`model.capsule_biases`) it has 160 more: [10, 16] on DigitCaps, and PrimaryCaps' [32, 8] in place
of its convolution's 256.
"""
import keras
import tensorflow as tf

from capstf import losses
from capstf.layers import CapsuleLength, CapsuleMask, Conv, DigitCapsules, PrimaryCapsules
from capstf.model.base import Model

KERNEL = 9  # both convolutions, as in the paper


def decoder_initializers(decoder_init: str) -> dict:
    """model.decoder_init -> one decoder Dense layer's initializer arguments, made afresh for each
    layer: a Keras initializer draws its seed when it is made, so one made once (at import) would
    give every layer, and every train.seed, the same draws."""
    if decoder_init == "truncated-normal-0.1":  # the authors' models/layers/variables.py
        return {"kernel_initializer": keras.initializers.TruncatedNormal(stddev=0.1),
                "bias_initializer": keras.initializers.Constant(0.1)}
    return {}  # glorot-uniform: Keras' own, Glorot-uniform kernels and zero biases


class CapsNet(Model):
    """The paper's CapsNet, built from a ModelConfig and the layers of `capstf.layers`.

    Args:
      cfg: ModelConfig (input size, channels, classes, capsule sizes, routing, decoder).
      jit_routing: compile routing with XLA, together with everything else after the two
        convolutions (DigitCaps, lengths, decoder): same numbers as plain graph mode, and on
        CPUs one XLA cluster is faster than routing alone (docs/performance.md). The
        convolutions stay outside: XLA's CPU convolutions are many times slower.
      precision: "float32", or "mixed_bfloat16"/"mixed_float16" for the two convolutions
        (routing, squash, decoder and losses stay float32).
      forward_conv_gradients: the convolutions' gradients as forward convolutions (faster on
        oneDNN CPUs) or, if False, TensorFlow's own (see `capstf.layers.conv2d_valid`).
    """

    def __init__(self, cfg, jit_routing=True, precision="float32", forward_conv_gradients=True, **kwargs):
        super().__init__(**kwargs)
        self.cfg = cfg
        self.conv1 = Conv(cfg.conv1_filters, KERNEL, strides=1, relu=True, forward_gradients=forward_conv_gradients,
                          dtype=precision, name="conv1")
        self.primary = PrimaryCapsules(cfg.primary_caps_types, cfg.primary_caps_dim, KERNEL, strides=2,
                                       forward_conv_gradients=forward_conv_gradients,
                                       one_input_routing=cfg.capsule_biases, dtype=precision, name="primary_caps")
        self.digit = DigitCapsules(cfg.num_classes, cfg.digit_caps_dim, cfg.routing_iters, cfg.routing_gradients,
                                   cfg.routing_none_of_the_above, use_bias=cfg.capsule_biases, name="digit_caps")
        self.length = CapsuleLength(name="length")
        self.jit_routing = jit_routing
        # Only a model with a decoder has a mask: a layer never called stays unbuilt, and Keras
        # warns about unbuilt state.
        self.mask, self.decoder = None, None
        if cfg.decoder:
            self.mask = CapsuleMask(cfg.digits_per_image, name="mask")
            pixels = cfg.input_size * cfg.input_size * cfg.channels
            dense = lambda units, activation: keras.layers.Dense(units, activation, **decoder_initializers(cfg.decoder_init))
            self.decoder = keras.Sequential([dense(512, "relu"), dense(1024, "relu"), dense(pixels, "sigmoid")],
                                            name="decoder")
        self(tf.zeros([1, cfg.input_size, cfg.input_size, cfg.channels]))  # creates the weights

    def call(self, images, labels=None, training=False):
        """images [batch, H, W, C] in [0, 1]; labels int [batch] or [batch, k] to mask with.

        Returns a dict: probabilities [batch, classes] (capsule lengths), capsules
        [batch, classes, dim], and with a decoder reconstructions [batch, k, H, W, C] (k =
        digits per image), decoded from the labelled capsules if labels are given, else from
        the k longest.
        """
        primary = self.primary(self.conv1(images))  # [batch, in_caps, in_dim]
        classes = None if labels is None else self.labelled_classes(labels)
        return (self.from_primary_capsules_xla if self.jit_routing else self.from_primary_capsules)(primary, classes)

    def labelled_classes(self, labels):
        """Labels int [batch] or [batch, k] -> the classes to decode, [batch, k]."""
        return tf.reshape(labels, [-1, self.cfg.digits_per_image])

    def from_primary_capsules(self, primary, classes=None):
        """Primary capsules -> the outputs of `call`; decodes `classes`, or the k longest."""
        capsules = self.digit(primary)  # [batch, classes, dim]
        lengths = self.length(capsules)  # [batch, classes]
        out = {"probabilities": lengths, "capsules": capsules}
        if self.decoder is not None:
            if classes is None:
                classes = tf.math.top_k(lengths, self.cfg.digits_per_image).indices
            out["reconstructions"] = self.reconstruct(capsules, classes)
        return out

    @tf.function(jit_compile=True, reduce_retracing=True)
    def from_primary_capsules_xla(self, primary, classes=None):
        return self.from_primary_capsules(primary, classes)

    def losses_and_gradients(self, batch, example_weight):
        """Model.losses_and_gradients; with jit_routing, everything after the convolutions is
        compiled forward and backward as one XLA computation. TensorFlow's own gradient of
        `from_primary_capsules_xla` is a second computation fed what the first saved, nearly
        twice as slow as one (docs/performance.md)."""
        if not self.jit_routing:
            return super().losses_and_gradients(batch, example_weight)
        with tf.GradientTape() as tape:
            primary = self.primary(self.conv1(batch["image"]))  # [batch, in_caps, in_dim]
        out, losses, d_primary, capsule_grads = self._capsule_losses_and_gradients_xla(primary, batch, example_weight)
        conv_variables = self.conv1.trainable_variables + self.primary.trainable_variables
        conv_grads = tape.gradient(primary, conv_variables, output_gradients=d_primary)
        by_variable = {id(v): g for v, g in zip(conv_variables + self._capsule_variables(), conv_grads + capsule_grads)}
        return out, losses, [by_variable[id(v)] for v in self.trainable_variables]

    def _capsule_variables(self):
        """The variables after the convolutions: DigitCaps' and the decoder's."""
        return self.digit.trainable_variables + (self.decoder.trainable_variables if self.decoder else [])

    @tf.function(jit_compile=True, reduce_retracing=True)
    def _capsule_losses_and_gradients_xla(self, primary, batch, example_weight):
        """Outputs, losses, d/d(primary) and d/d(_capsule_variables) from the primary capsules on."""
        with tf.GradientTape() as tape:
            tape.watch(primary)
            out = self.from_primary_capsules(primary, self.labelled_classes(batch["label"]))
            losses, loss = self.training_loss(out, batch, example_weight)
        grads = tape.gradient(loss, [primary] + self._capsule_variables())
        return out, losses, grads[0], grads[1:]

    def reconstruct(self, capsules, classes):
        """Decodes the capsules of `classes` [batch, k] -> images [batch, k, H, W, C]."""
        masked = self.mask([capsules, classes])  # [batch, k, classes * dim]
        pixels = self.decoder(tf.reshape(masked, [-1, masked.shape[-1]]))
        s, c = self.cfg.input_size, self.cfg.channels
        return tf.reshape(pixels, [-1, classes.shape[1], s, s, c])

    def per_example_losses(self, out, batch):
        """Margin (+ weighted reconstruction) loss per example, and its parts."""
        margin = self.cfg.margin_loss_scale * losses.margin_loss(
            out["probabilities"], losses.multi_hot(batch["label"], self.cfg.num_classes))
        result = {"margin_loss": margin, "loss": margin}
        if self.decoder is not None:
            targets = batch.get("components", batch["image"][:, None])
            recon = losses.reconstruction_loss(out["reconstructions"], targets, self.cfg.reconstruction_weight)
            result.update(reconstruction_loss=recon, loss=margin + recon)
        return result
