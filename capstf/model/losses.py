"""Margin loss and reconstruction loss, per example (callers average over the global batch)."""
import tensorflow as tf

M_PLUS, M_MINUS, LAMBDA = 0.9, 0.1, 0.5


def margin_loss(lengths, targets):
    """Eq. 4 of the paper, summed over classes.

    Args:
      lengths: [batch, classes] capsule lengths.
      targets: [batch, classes] multi-hot (1 for each digit present).
    Returns:
      [batch] losses.
    """
    present = targets * tf.square(tf.maximum(0.0, M_PLUS - lengths))
    absent = LAMBDA * (1.0 - targets) * tf.square(tf.maximum(0.0, lengths - M_MINUS))
    return tf.reduce_sum(present + absent, axis=-1)


def reconstruction_loss(reconstructions, targets, weight):
    """weight x sum of squared pixel errors, over every reconstructed digit of an example.

    Args:
      reconstructions, targets: [batch, digits, H, W, C].
    Returns:
      [batch] losses.
    """
    return weight * tf.reduce_sum(tf.square(reconstructions - targets), axis=[1, 2, 3, 4])


def multi_hot(labels, num_classes):
    """int labels [batch] or [batch, k] -> float [batch, num_classes]."""
    one_hot = tf.one_hot(labels, num_classes)
    return one_hot if one_hot.shape.rank == 2 else tf.reduce_max(one_hot, axis=1)
