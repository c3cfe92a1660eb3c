"""The paper's baseline CNN for Table 1: 35.4M parameters on MNIST.

Three 5x5 stride-1 convolutions (256, 256, 128 channels), FC 328, FC 192, dropout, FC classes.
On 40x40 inputs (the affNIST test) the same head would hold 67M parameters: there
`baseline_pool` max-pools 2x2 after the first two convolutions and `baseline_hidden` sets the
first FC width, to match the CapsNet's parameter count.
"""
import keras
import tensorflow as tf

from capstf.model.base import Model


class BaselineCNN(Model):
    """Args: cfg: ModelConfig (input size, channels, classes, digits per image, baseline_*)."""

    def __init__(self, cfg, precision="float32", **kwargs):
        super().__init__(**kwargs)
        self.cfg = cfg
        conv = lambda n, name: keras.layers.Conv2D(n, 5, padding="same", activation="relu",
                                                   dtype=precision, name=name)
        pool = lambda name: [keras.layers.MaxPooling2D(2, dtype=precision, name=name)] if cfg.baseline_pool else []
        self.features = keras.Sequential([conv(256, "conv1"), *pool("pool1"), conv(256, "conv2"), *pool("pool2"),
                                          conv(128, "conv3"), keras.layers.Flatten(dtype="float32")], name="features")
        self.head = keras.Sequential([keras.layers.Dense(cfg.baseline_hidden, activation="relu"),
                                      keras.layers.Dense(192, activation="relu"),
                                      keras.layers.Dropout(0.5),
                                      keras.layers.Dense(cfg.num_classes)], name="head")
        self(tf.zeros([1, cfg.input_size, cfg.input_size, cfg.channels]))  # creates the weights

    def call(self, images, labels=None, training=False):
        logits = self.head(tf.cast(self.features(images), tf.float32), training=training)
        return {"logits": logits, "probabilities": tf.nn.softmax(logits)}

    def per_example_losses(self, out, batch):
        """Softmax cross-entropy against the label distribution (two-hot / 2 for two digits)."""
        targets = tf.one_hot(batch["label"], self.cfg.num_classes)
        if targets.shape.rank == 3:
            targets = tf.reduce_mean(targets, axis=1)
        loss = tf.nn.softmax_cross_entropy_with_logits(targets, out["logits"])
        return {"loss": loss}

