"""The paper's data sets, generated on the fly in tf.data.

MNIST-based sets (mnist, multimnist, expanded-mnist, affnist) place, pair and warp digits;
TFDS image sets (smallnorb, cifar10, svhn, tfds:NAME) crop, flip and jitter their images.

Every example is a pure function of (seed, its position in the stream), so a run is
reproducible, resumes mid-epoch at the exact example it stopped at, and shards across workers.
A pipeline has two stages:

1. per example, cheap: which digit(s) and which random geometry (`_draw_*`), from stateless
   random ops seeded by the example's position;
2. per batch, vectorized: gather the digits and render them (`translate`, `affine_warp`).

Batches are dicts: `image` float32 [batch, H, W, C] in [0, 1]; `label` int32 [batch] (one
digit) or [batch, 2] (MultiMNIST); `components` float32 [batch, 2, H, W, 1] (MultiMNIST: each
digit alone, the reconstruction targets).
"""
import dataclasses
import math
from typing import Callable, Dict, NamedTuple

import numpy as np
import tensorflow as tf

from capstf.catalog import Canvas, data_set
from capstf.config import fit_model_to
from capstf.data.sources import Examples
from capstf.errors import CapstfError

NUM_CLASSES = 10
AUTOTUNE = tf.data.AUTOTUNE


class Drawing(NamedTuple):
    """How one kind of example (capstf.catalog's DataSet.examples) is made."""
    draw: Callable  # (digit, key, seed, index tables, cfg, train) -> dict of per-example params
    render: Callable  # (batch of params, images tensor, cfg, canvas) -> batch dict


# ------------------------------------------------------------------------- geometry (batched)

def centre_on_canvas(digits, canvas):
    """[batch, h, w] -> [batch, canvas, canvas]: each digit in the middle, zeros around it."""
    h = digits.shape[1]
    before, after = (canvas - h) // 2, canvas - h - (canvas - h) // 2
    return tf.pad(digits, [[0, 0], [before, after], [before, after]])


def translate(digits, dy, dx, canvas, max_shift):
    """Centres each digit on a canvas and shifts it by whole pixels, filling with zeros.

    Args:
      digits: [batch, h, w] float images.
      dy, dx: [batch] int32 shifts, each within [-max_shift, max_shift].
      canvas: output height and width.
      max_shift: static bound on |dy|, |dx| (sets the padding).
    Returns:
      [batch, canvas, canvas] float images.
    """
    padded = centre_on_canvas(digits, canvas + 2 * max_shift)  # [b, canvas+2m, canvas+2m]
    window = tf.range(canvas)
    rows = (max_shift - dy)[:, None] + window  # [b, canvas]
    cols = (max_shift - dx)[:, None] + window
    shifted = tf.gather(padded, rows, axis=1, batch_dims=1)  # [b, canvas, canvas+2m]
    return tf.gather(shifted, cols, axis=2, batch_dims=1)


def ink_box(digits):
    """[batch, h, w] -> [batch, 4] (top, left, bottom, right) pixel indices of non-zero ink."""
    def extent(profile):  # [b, n] -> first and last index with ink
        n = tf.shape(profile)[1]
        has = profile > 0
        idx = tf.range(n)[None]
        first = tf.reduce_min(tf.where(has, idx, n), axis=1)
        last = tf.reduce_max(tf.where(has, idx, -1), axis=1)
        return first, last
    top, bottom = extent(tf.reduce_max(digits, axis=2))
    left, right = extent(tf.reduce_max(digits, axis=1))
    return tf.stack([top, left, bottom, right], axis=1)


def affine_matrices(angle_deg, shear, scale_x, scale_y):
    """[batch] parameters -> [batch, 2, 2] forward matrices acting on (x, y): rotate(shear(scale))."""
    a = angle_deg * (math.pi / 180.0)
    cos, sin, one, zero = tf.cos(a), tf.sin(a), tf.ones_like(a), tf.zeros_like(a)
    rotation = tf.reshape(tf.stack([cos, -sin, sin, cos], 1), [-1, 2, 2])
    shearing = tf.reshape(tf.stack([one, shear, zero, one], 1), [-1, 2, 2])
    scaling = tf.reshape(tf.stack([scale_x, zero, zero, scale_y], 1), [-1, 2, 2])
    return rotation @ shearing @ scaling


def affine_warp(digits, params, canvas):
    """Centres digits on the canvas and applies an affine map that keeps all ink inside it.

    Args:
      digits: [batch, 28, 28] float images.
      params: dict of [batch] floats: angle (degrees), shear, scale_x, scale_y, and tx, ty in
        [0, 1]: where in the range of translations that keep the digit inside the canvas.
      canvas: output height and width.
    Returns:
      ([batch, canvas, canvas] images, [batch, 2, 2] forward matrices, [batch, 2] translations).
    """
    placed = centre_on_canvas(digits, canvas)
    forward = affine_matrices(params["angle"], params["shear"], params["scale_x"], params["scale_y"])
    centre = (canvas - 1) / 2.0
    # The support of a bilinear image reaches one pixel beyond its outermost ink pixels.
    box = tf.cast(ink_box(placed), tf.float32) + [-1.0, -1.0, 1.0, 1.0]
    corners = tf.stack([tf.stack([box[:, 1], box[:, 0]], 1), tf.stack([box[:, 3], box[:, 0]], 1),
                        tf.stack([box[:, 1], box[:, 2]], 1), tf.stack([box[:, 3], box[:, 2]], 1)],
                       1)  # [b, 4 corners, (x, y)]
    moved = tf.einsum("bij,bkj->bki", forward, corners - centre) + centre
    low = -tf.reduce_min(moved, 1)  # [b, 2] smallest translation that keeps ink at >= 0
    high = (canvas - 1.0) - tf.reduce_max(moved, 1)
    fraction = tf.stack([params["tx"], params["ty"]], 1)
    translation = tf.where(high >= low, low + fraction * (high - low), (low + high) / 2)
    return warp(placed, forward, translation), forward, translation


def warp(images, forward, translation):
    """Applies x -> forward @ (x - centre) + centre + translation to [batch, n, n] images.

    Bilinear, zeros outside; forward is [batch, 2, 2] on (x, y), translation [batch, 2].
    """
    n = images.shape[1]
    centre = (n - 1) / 2.0
    # ImageProjectiveTransformV3 maps each output pixel back to its input pixel.
    inverse = tf.linalg.inv(forward)
    offset = centre - tf.einsum("bij,bj->bi", inverse, translation + centre)
    transforms = tf.concat([inverse[:, 0], offset[:, :1], inverse[:, 1], offset[:, 1:],
                            tf.zeros_like(offset)], 1)  # [b, 8]
    warped = tf.raw_ops.ImageProjectiveTransformV3(
        images=images[..., None], transforms=transforms, output_shape=[n, n],
        fill_value=0.0, interpolation="BILINEAR", fill_mode="CONSTANT")
    return warped[..., 0]


# ------------------------------------------------------------------- per-example randomness

def _uniform(key, seed, n):
    """n floats in [0, 1), a pure function of (seed, key)."""
    return tf.random.stateless_uniform([n], seed=tf.stack([seed, key]))


def _shift(u, max_shift):
    """Floats in [0, 1) -> integer shifts uniform in [-max_shift, max_shift]."""
    return tf.cast(tf.floor(u * (2 * max_shift + 1)), tf.int32) - max_shift


def _draw_single(digit, key, seed, tables, cfg, train):
    max_shift = cfg.max_shift if (train or data_set(cfg.dataset).shift_at_test) else 0
    u = _uniform(key, seed, 4)
    params = {"digit": digit, "dy": _shift(u[0], max_shift), "dx": _shift(u[1], max_shift)}
    if train and (cfg.train_max_rotation_deg > 0 or cfg.train_max_scale_change > 0):
        on = 1.0  # 0 once past data.train_rotate_scale_epochs: shifts only from then on
        if cfg.train_rotate_scale_epochs > 0:
            epoch = key // tf.size(tables["labels"], out_type=tf.int64)
            on = tf.cast(tf.cast(epoch, tf.float32) < cfg.train_rotate_scale_epochs, tf.float32)
        params["angle"] = on * (2 * u[2] - 1) * cfg.train_max_rotation_deg
        params["scale"] = 1 + on * (2 * u[3] - 1) * cfg.train_max_scale_change
    return params


def _draw_pair(digit, key, seed, tables, cfg, train):
    """A partner of a different class from the same split, both digits shifted independently."""
    u = _uniform(key, seed, 6)
    label = tf.gather(tables["labels"], digit)
    partner_class = (label + 1 + tf.cast(u[0] * (NUM_CLASSES - 1), tf.int32)) % NUM_CLASSES
    count = tf.gather(tables["class_count"], partner_class)
    within = tf.minimum(tf.cast(u[1] * tf.cast(count, tf.float32), tf.int32), count - 1)
    partner = tf.gather(tables["by_class"], tf.gather(tables["class_start"], partner_class) + within)
    shifts = _shift(u[2:], cfg.max_shift)
    return {"digit": tf.stack([digit, partner]), "dy": shifts[:2], "dx": shifts[2:]}


def _draw_affine(digit, key, seed, tables, cfg, train):
    u = _uniform(key, seed, 6)
    between = lambda x, low, high: low + x * (high - low)
    return {"digit": digit,
            "angle": between(u[0], -cfg.max_rotation_deg, cfg.max_rotation_deg),
            "shear": between(u[1], -cfg.max_shear, cfg.max_shear),
            "scale_x": between(u[2], cfg.min_scale, cfg.max_scale),
            "scale_y": between(u[3], cfg.min_scale, cfg.max_scale),
            "tx": u[4], "ty": u[5]}


def _draw_crop(image, key, seed, tables, cfg, train):
    """TFDS image sets: training draws where to crop, whether to mirror, and a brightness and
    a contrast jitter (five uniforms, used in `_render_crop`); testing crops the centre."""
    params = {"digit": image}
    if train:
        params["u"] = _uniform(key, seed, 5)
    return params


# ---------------------------------------------------------------------- rendering (batched)

def _gather_digits(images, index):
    return tf.cast(tf.gather(images, index), tf.float32) / 255.0


def _render_single(batch, images, cfg, canvas):
    digits = _gather_digits(images, batch["digit"])
    if "angle" in batch:  # turn and scale the centred digit about its centre, then shift it
        forward = affine_matrices(batch["angle"], tf.zeros_like(batch["angle"]), batch["scale"], batch["scale"])
        shift = tf.cast(tf.stack([batch["dx"], batch["dy"]], 1), tf.float32)  # (x, y)
        placed = warp(centre_on_canvas(digits, canvas), forward, shift)
    else:
        placed = translate(digits, batch["dy"], batch["dx"], canvas, max(cfg.max_shift, 0))
    return {"image": placed[..., None], "label": batch["label"]}


def _render_pair(batch, images, cfg, canvas):
    digits = _gather_digits(images, batch["digit"])  # [b, 2, 28, 28]
    flat = lambda t: tf.reshape(t, [-1] + t.shape[2:].as_list())
    placed = translate(flat(digits), flat(batch["dy"]), flat(batch["dx"]), canvas, cfg.max_shift)
    components = tf.reshape(placed, [-1, 2, canvas, canvas, 1])
    image = tf.minimum(components[:, 0] + components[:, 1], 1.0)  # the paper's overlay: sum, clip
    return {"image": image, "label": batch["label"], "components": components}


def _render_affine(batch, images, cfg, canvas):
    warped, _, _ = affine_warp(_gather_digits(images, batch["digit"]), batch, canvas)
    return {"image": warped[..., None], "label": batch["label"]}


def _render_crop(batch, images, cfg, canvas):
    """Pads each image by data.max_shift, takes a canvas x canvas crop (random in training,
    central in testing), and in training mirrors and jitters it as drawn."""
    pixels = tf.cast(tf.gather(images, batch["digit"]), tf.float32) / 255.0  # [b, H, W, C]
    pad = cfg.max_shift
    pixels = tf.pad(pixels, [[0, 0], [pad, pad], [pad, pad], [0, 0]])
    room = pixels.shape[1] - canvas  # the crop's possible offsets: 0..room
    train = "u" in batch
    if train:
        u = batch["u"]  # [b, 5]
        top, left = (tf.cast(tf.floor(u[:, i] * (room + 1)), tf.int32) for i in (0, 1))
    else:
        top = left = tf.fill(tf.shape(batch["digit"]), room // 2)
    window = tf.range(canvas)
    pixels = tf.gather(pixels, top[:, None] + window, axis=1, batch_dims=1)  # [b, canvas, W, C]
    pixels = tf.gather(pixels, left[:, None] + window, axis=2, batch_dims=1)  # [b, canvas, canvas, C]
    if train:
        each = lambda values: values[:, None, None, None]
        if cfg.random_flip:
            pixels = tf.where(each(u[:, 2] < 0.5), tf.reverse(pixels, [2]), pixels)
        pixels += each((2 * u[:, 3] - 1) * cfg.max_brightness_delta)
        mean = tf.reduce_mean(pixels, [1, 2], keepdims=True)  # per image and channel, as tf.image.adjust_contrast
        pixels = (pixels - mean) * each(1 + (2 * u[:, 4] - 1) * cfg.max_contrast_change) + mean
        pixels = tf.clip_by_value(pixels, 0.0, 1.0)
    return {"image": pixels, "label": batch["label"]}


DRAWINGS: Dict[str, Drawing] = {
    "digit": Drawing(_draw_single, _render_single),
    "pair": Drawing(_draw_pair, _render_pair),
    "affine": Drawing(_draw_affine, _render_affine),
    "crop": Drawing(_draw_crop, _render_crop),  # tfds:NAME: the whole image, padded and cropped
}


def input_canvas(cfg, examples: Examples) -> Canvas:
    """What the model sees of data set `cfg.dataset` made from `examples`: size, channels, classes."""
    canvas = data_set(cfg.dataset).canvas
    channels = examples.images.shape[3] if examples.images.ndim == 4 else 1
    return Canvas(canvas.size if canvas else examples.images.shape[1], canvas.digits_per_image if canvas else 1,
                  channels, examples.num_classes)


def fit_model_to_data(cfg, examples: Examples):
    """A tfds:NAME data set's size, channels and classes are known once it is loaded: `cfg` (a
    whole Config) with the model config taking them from its training examples."""
    if data_set(cfg.data.dataset).canvas is None:
        return dataclasses.replace(cfg, model=fit_model_to(cfg.model, input_canvas(cfg.data, examples)))
    return cfg


# ---------------------------------------------------------------------------- the pipeline

def _index_tables(labels: np.ndarray):
    """Lookup tables to draw a random digit of a given class in graph mode."""
    by_class = np.argsort(labels, kind="stable").astype(np.int32)
    counts = np.bincount(labels, minlength=NUM_CLASSES).astype(np.int32)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int32)
    return {"labels": tf.constant(labels, tf.int32), "by_class": tf.constant(by_class),
            "class_count": tf.constant(counts), "class_start": tf.constant(starts)}


def num_examples(cfg, examples: Examples, split: str) -> int:
    """Examples in one pass over a split (MultiMNIST test: digits x partners_per_digit)."""
    n = len(examples.labels)
    if data_set(cfg.dataset).examples == "pair" and split == "test":
        return n * cfg.partners_per_digit
    return n


def make_dataset(cfg, examples: Examples, split: str, batch_size: int, seed: int,
                 start_example: int = 0, pipeline_id: int = 0, num_pipelines: int = 1,
                 limit: int = 0) -> tf.data.Dataset:
    """Batched examples of data set `cfg.dataset` built from `examples`.

    Args:
      cfg: a DataConfig (dataset name, shift, partner and affine settings).
      split: "train" gives an endless stream, a fresh permutation and fresh randomness each
        epoch; "test" gives one deterministic pass (no shifts for mnist).
      batch_size: examples per batch (the per-replica batch under tf.distribute).
      seed: the data seed: equal seeds give equal streams.
      start_example: position in the stream to start at (to resume training mid-epoch).
      pipeline_id, num_pipelines: this input pipeline takes every num_pipelines-th example.
      limit: if > 0, at most this many examples (test split).
    """
    dataset = data_set(cfg.dataset)
    train = split == "train"
    canvas = dataset.canvas.size if dataset.canvas else examples.images.shape[1]
    pairs = dataset.examples == "pair"
    drawing = DRAWINGS[dataset.examples]
    if dataset.real_files and examples.images.shape[1] == canvas:  # real affNIST, already warped: as is
        drawing = DRAWINGS["digit"]
    if canvas > examples.images.shape[1] + 2 * cfg.max_shift and dataset.examples == "crop":
        raise CapstfError(f"{cfg.dataset}: its {examples.images.shape[1]}-pixel images cannot give "
                          f"{canvas}x{canvas} crops.")
    n = len(examples.labels)
    images = tf.constant(examples.images)
    tables = _index_tables(examples.labels)
    missing = np.flatnonzero(tables["class_count"].numpy() == 0)
    if pairs and missing.size:  # each digit's partner is drawn from another class
        raise CapstfError(f"MultiMNIST draws partners from every class, but the {split} digits hold no "
                          f"{', '.join(map(str, missing))}.")
    total = num_examples(cfg, examples, split)
    if limit:
        total = min(total, limit)
    stop = np.iinfo(np.int64).max if train else total
    positions = tf.data.Dataset.range(start_example + pipeline_id, stop, num_pipelines)
    salt = tf.constant(seed * 2 + (0 if train else 1), tf.int64)  # train and test never share randomness

    def draw(position):
        if train:  # each epoch is a fresh stateless permutation of the digits
            epoch, i = position // n, position % n
            digit = tf.random.experimental.index_shuffle(i, tf.stack([salt, epoch]), n - 1)
        else:
            digit = position // cfg.partners_per_digit if pairs else position
        params = drawing.draw(tf.cast(digit, tf.int32), position, salt, tables, cfg, train)
        params["label"] = tf.gather(tables["labels"], params["digit"])
        return params

    def render(batch):
        return drawing.render(batch, images, cfg, canvas)

    return (positions.map(draw, num_parallel_calls=AUTOTUNE, deterministic=True)
            .batch(batch_size, drop_remainder=train, num_parallel_calls=AUTOTUNE, deterministic=True)
            .map(render, num_parallel_calls=AUTOTUNE, deterministic=True)
            .prefetch(AUTOTUNE))
