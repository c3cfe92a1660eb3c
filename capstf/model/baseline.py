"""The CNNs CapsNets are compared with: the paper's baseline for Table 1, and for affNIST the
authors' own baseline and a CNN without pooling that a public reproduction used.

- `baseline` (the paper's text): three 5x5 stride-1 convolutions (256, 256, 128 channels), FC
  328, FC 192, dropout, FC classes; 35.4M parameters on MNIST. On 40x40 inputs (the affNIST
  test) the same head would hold 67M parameters: there `baseline_pool` max-pools 2x2 after the
  first two convolutions and `baseline_hidden` sets the first FC width, to match the CapsNet's
  parameter count.
- `cnn-two-pools` (the authors' code, models/conv_model.py): conv 5x5 512, 2x2 max-pool, conv
  5x5 256, 2x2 max-pool, FC 1024, FC classes (padding SAME, as `baseline`).
- `cnn-no-pooling`: three 5x5 VALID convolutions (256, 256, 128) with batch norm, FC 328, FC
  192, dropout 0.5, FC classes: pooling-free, as the reproduction that reported CapsNet 75.9%
  against this CNN's 61.7% on real affNIST.
"""
import keras
import tensorflow as tf

from capstf.model.base import Model


def conv(filters, padding, precision, name, batch_norm=False):
    """A 5x5 ReLU convolution, batch-normalized before the ReLU if asked."""
    if not batch_norm:
        return [keras.layers.Conv2D(filters, 5, padding=padding, activation="relu", dtype=precision, name=name)]
    return [keras.layers.Conv2D(filters, 5, padding=padding, use_bias=False, dtype=precision, name=name),
            keras.layers.BatchNormalization(dtype=precision, name=f"{name}_norm"),
            keras.layers.ReLU(dtype=precision, name=f"{name}_relu")]


def layers(cfg, precision):
    """(feature layers, head layers before the output) of the CNN that cfg.kind names."""
    pool = lambda name: [keras.layers.MaxPooling2D(2, dtype=precision, name=name)]
    dense = lambda units: [keras.layers.Dense(units, activation="relu")]
    if cfg.kind == "cnn-two-pools":
        return ([*conv(512, "same", precision, "conv1"), *pool("pool1"), *conv(256, "same", precision, "conv2"),
                 *pool("pool2")], dense(1024))
    if cfg.kind == "cnn-no-pooling":
        return ([layer for i, filters in enumerate((256, 256, 128), 1)
                 for layer in conv(filters, "valid", precision, f"conv{i}", batch_norm=True)],
                [*dense(328), *dense(192), keras.layers.Dropout(0.5)])
    maybe_pool = lambda name: pool(name) if cfg.baseline_pool else []
    return ([*conv(256, "same", precision, "conv1"), *maybe_pool("pool1"), *conv(256, "same", precision, "conv2"),
             *maybe_pool("pool2"), *conv(128, "same", precision, "conv3")],
            [*dense(cfg.baseline_hidden), *dense(192), keras.layers.Dropout(0.5)])


class BaselineCNN(Model):
    """Args: cfg: ModelConfig (kind, input size, channels, classes, digits per image, baseline_*)."""

    def __init__(self, cfg, precision="float32", **kwargs):
        super().__init__(**kwargs)
        self.cfg = cfg
        features, head = layers(cfg, precision)
        self.features = keras.Sequential([*features, keras.layers.Flatten(dtype="float32")], name="features")
        self.head = keras.Sequential([*head, keras.layers.Dense(cfg.num_classes)], name="head")
        self(tf.zeros([1, cfg.input_size, cfg.input_size, cfg.channels]))  # creates the weights

    def call(self, images, labels=None, training=False):
        features = self.features(images, training=training)  # batch norm: batch statistics in training
        logits = self.head(tf.cast(features, tf.float32), training=training)
        return {"logits": logits, "probabilities": tf.nn.softmax(logits)}

    def per_example_losses(self, out, batch):
        """Softmax cross-entropy against the label distribution (two-hot / 2 for two digits)."""
        targets = tf.one_hot(batch["label"], self.cfg.num_classes)
        if targets.shape.rank == 3:
            targets = tf.reduce_mean(targets, axis=1)
        loss = tf.nn.softmax_cross_entropy_with_logits(targets, out["logits"])
        return {"loss": loss}
