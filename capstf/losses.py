"""The paper's losses: as functions per example (capstf's training loop averages them over the
global batch) and as `keras.losses.Loss` classes for `model.compile(loss=...)`."""
import keras
import tensorflow as tf

M_PLUS, M_MINUS, LAMBDA = 0.9, 0.1, 0.5  # the paper's margins and down-weighting of absent classes


def margin_loss(lengths, targets, m_plus=M_PLUS, m_minus=M_MINUS, lambda_=LAMBDA):
    """Eq. 4 of the paper, summed over classes.

    Args:
      lengths: [batch, classes] capsule lengths.
      targets: [batch, classes] multi-hot (1 for each entity present; one-hot for one digit).
    Returns:
      [batch] losses.
    """
    present = targets * tf.square(tf.maximum(0.0, m_plus - lengths))
    absent = lambda_ * (1.0 - targets) * tf.square(tf.maximum(0.0, lengths - m_minus))
    return tf.reduce_sum(present + absent, axis=-1)


def reconstruction_loss(reconstructions, targets, weight):
    """weight x the sum of squared pixel errors over everything but the batch axis.

    Args:
      reconstructions, targets: [batch, ...] (capstf: [batch, digits, H, W, C]).
    Returns:
      [batch] losses.
    """
    squared = tf.square(reconstructions - targets)
    return weight * tf.reduce_sum(tf.reshape(squared, [tf.shape(squared)[0], -1]), axis=-1)


def multi_hot(labels, num_classes):
    """int labels [batch] or [batch, k] -> float [batch, num_classes]."""
    one_hot = tf.one_hot(labels, num_classes)
    return one_hot if one_hot.shape.rank == 2 else tf.reduce_max(one_hot, axis=1)


@keras.saving.register_keras_serializable(package="capstf")
class MarginLoss(keras.losses.Loss):
    """The margin loss on capsule lengths (`CapsuleLength`'s output).

    Args:
      m_plus, m_minus: a present class is pushed above m_plus, an absent one below m_minus.
      lambda_: the weight of the absent classes' term.

    y_true: [batch, classes] one-hot or multi-hot targets. y_pred: [batch, classes] lengths.
    """

    def __init__(self, m_plus=M_PLUS, m_minus=M_MINUS, lambda_=LAMBDA, name="margin_loss", **kwargs):
        super().__init__(name=name, **kwargs)
        if not 0 <= m_minus < m_plus <= 1 or lambda_ < 0:
            raise ValueError(f"need 0 <= m_minus < m_plus <= 1 and lambda_ >= 0, got {m_minus}, {m_plus}, {lambda_}")
        self.m_plus, self.m_minus, self.lambda_ = m_plus, m_minus, lambda_

    def call(self, y_true, y_pred):
        return margin_loss(tf.cast(y_pred, tf.float32), tf.cast(y_true, tf.float32),
                           self.m_plus, self.m_minus, self.lambda_)

    def get_config(self):
        return {**super().get_config(), "m_plus": self.m_plus, "m_minus": self.m_minus, "lambda_": self.lambda_}


@keras.saving.register_keras_serializable(package="capstf")
class ReconstructionLoss(keras.losses.Loss):
    """weight x the sum of squared pixel errors per example (the paper: weight 0.0005).

    y_true: [batch, ...] target images. y_pred: reconstructions of the same shape.
    """

    def __init__(self, weight=0.0005, name="reconstruction_loss", **kwargs):
        super().__init__(name=name, **kwargs)
        if weight < 0:
            raise ValueError(f"weight must be >= 0, got {weight}")
        self.weight = weight

    def call(self, y_true, y_pred):
        return reconstruction_loss(tf.cast(y_pred, tf.float32), tf.cast(y_true, tf.float32), self.weight)

    def get_config(self):
        return {**super().get_config(), "weight": self.weight}
