"""What training needs of a model beyond Keras': per-example losses and their gradients."""
import keras
import tensorflow as tf


class Model(keras.Model):
    """A Keras model called as model(images, labels=None, training=False) -> dict of outputs."""

    def per_example_losses(self, out, batch):
        """{"loss": [batch], and its named parts} for the outputs of one batch."""
        raise NotImplementedError

    def training_loss(self, out, batch, example_weight):
        """The per-example losses, and what training differentiates: example_weight * their sum."""
        losses = self.per_example_losses(out, batch)
        return losses, tf.reduce_sum(losses["loss"]) * example_weight

    def losses_and_gradients(self, batch, example_weight):
        """One training batch's outputs, per-example losses, and the gradients of
        `training_loss` with respect to `trainable_variables`."""
        with tf.GradientTape() as tape:
            out = self(batch["image"], labels=batch["label"], training=True)
            losses, loss = self.training_loss(out, batch, example_weight)
        return out, losses, tape.gradient(loss, self.trainable_variables)
