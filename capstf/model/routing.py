"""Squash and routing by agreement (Sabour et al. 2017, Procedure 1)."""
import tensorflow as tf


def squash(s, axis=-1, eps=1e-7):
    """Shrinks vectors to length |s|^2 / (1 + |s|^2), keeping their direction.

    `eps` inside the square root keeps value and gradient finite at s = 0.
    """
    norm2 = tf.reduce_sum(tf.square(s), axis=axis, keepdims=True)
    return norm2 / (1.0 + norm2) * s / tf.sqrt(norm2 + eps)


def capsule_length(v, eps=1e-7):
    """[..., dim] -> [...]: the vector lengths, with a finite gradient at v = 0."""
    return tf.sqrt(tf.reduce_sum(tf.square(v), axis=-1) + eps)


def route_by_agreement(u_hat, iterations: int):
    """Routes predictions from child capsules i to parent capsules j.

    Args:
      u_hat: [in_caps, batch, out_caps, out_dim] predictions u_hat_{j|i} (in_caps first: this
        is the layout the prediction matmul produces, so no transpose is needed).
      iterations: routing iterations r >= 1 (r = 1: uniform coupling).
    Returns:
      v: [batch, out_caps, out_dim] parent capsules.
      c: [in_caps, batch, out_caps] the last coupling coefficients (sum to 1 over out_caps).
    """
    in_caps, out_caps = tf.shape(u_hat)[0], u_hat.shape[2]
    # Agreement updates see u_hat as a constant; gradients flow through the final weighted
    # sum only, as in the widely used implementations: it halves routing's backward cost.
    u_hat_const = tf.stop_gradient(u_hat)
    # Start from uniform coupling: softmax(zeros), without XLA constant-folding a softmax.
    c = tf.fill(tf.stack([in_caps, tf.shape(u_hat)[1], out_caps]), 1.0 / out_caps)
    logits = None
    for i in range(iterations):
        last = i == iterations - 1
        s = tf.einsum("ibj,ibjd->bjd", c, u_hat if last else u_hat_const)  # [batch, out_caps, dim]
        v = squash(s)
        if last:
            return v, c
        agreement = tf.einsum("ibjd,bjd->ibj", u_hat_const, v)  # [in_caps, batch, out_caps]
        logits = agreement if logits is None else logits + agreement
        c = tf.nn.softmax(logits, axis=-1)

