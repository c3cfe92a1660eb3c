"""The paper's accuracy rule, the one place it is written: train, evaluate and export use it."""
import tensorflow as tf

from capstf.losses import multi_hot


def exact_match(probabilities, labels):
    """[batch] bool: the k highest scores are exactly the k labels (k = 1 or 2 digits).

    For MultiMNIST this is the paper's rule: both longest capsules must be the true classes.
    """
    k = 1 if labels.shape.rank == 1 else labels.shape[1]
    labels = tf.reshape(labels, [-1, k])
    num_classes = probabilities.shape[-1]
    predicted = multi_hot(tf.math.top_k(probabilities, k).indices, num_classes)
    return tf.reduce_all(tf.equal(predicted, multi_hot(labels, num_classes)), axis=-1)
