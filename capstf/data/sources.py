"""Where examples come from: TFDS, a folder of MNIST IDX files, or the bundled sample.

Every source returns the same thing, `Examples(images uint8, labels int32 [n], num_classes)`,
so the data sets in `datasets.py` never care where the images came from: MNIST digits as
[n, 28, 28] (whichever source), TFDS image data sets as [n, H, W, C].
"""
import gzip
import socket
import struct
import zlib
from pathlib import Path
from typing import NamedTuple, Optional, Tuple

import numpy as np

from capstf.catalog import TFDS_PREFIX, TfdsImages, data_set
from capstf.errors import CapstfError, RuntimeFailure, first_line

SAMPLE_DIR = Path(__file__).parent / "sample"
IDX_FILES = {  # split -> (images, labels), as MNIST names them
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049
OFFLINE_HINT = ("Use `--data-dir sample` for the bundled 5,000+5,000 real MNIST digits, or "
                "`--data-dir DIR` for a folder with the four MNIST IDX files.")


class Examples(NamedTuple):
    images: np.ndarray  # uint8 [n, 28, 28] (MNIST digits) or [n, H, W, C] (TFDS image data sets)
    labels: np.ndarray  # int32 [n]
    num_classes: int = 10




MNIST_ON_TFDS = TfdsImages("mnist", ("image",), "label")


def load_examples(data_dir: str, split: str, dataset: str = "mnist", validation_digits: int = 0) -> Examples:
    """Loads one split of a data set's source images.

    data_dir: for MNIST-based data sets "" or "tfds" for TFDS, "sample", or a folder of IDX
      files; for TFDS image data sets "" (TFDS's default data dir) or a prepared TFDS data dir.
    validation_digits: N > 0 holds out the last N training examples: "train" is the rest,
      "validation" those N (for choosing settings without looking at the test examples).

    For dataset "affnist", a folder holding the real affNIST files (`test.mat` or
    `test_batches/*.mat`; `training.mat` or `training_batches/*.mat`) gives their 40x40
    digits as they are, instead of MNIST digits to be warped on the fly.
    """
    if split in ("train", "validation") and validation_digits:
        training, validation = load_training_split(data_dir, dataset, validation_digits)
        return training if split == "train" else validation
    if split == "validation":
        raise CapstfError("This model holds out no validation digits (data.validation_digits = 0); "
                          "use --split train or test.")
    if split not in IDX_FILES:
        raise CapstfError(f"Unknown split {split!r}; use one of {sorted(IDX_FILES)}.")
    if not data_set(dataset).digits:
        if data_dir == "sample":
            raise CapstfError(f"The bundled sample holds MNIST digits only, not {dataset}; use its TFDS "
                              "copy (no --data-dir) or --data-dir with a prepared TFDS data dir.")
        tfds_dir = "" if data_dir == "tfds" else data_dir
        return load_tfds(tfds_images(dataset, tfds_dir), split, tfds_dir)
    if data_dir in ("", "tfds"):
        mnist = load_tfds(MNIST_ON_TFDS, split, "")
        return mnist._replace(images=mnist.images[..., 0])
    folder = SAMPLE_DIR if data_dir == "sample" else Path(data_dir)
    if not folder.is_dir():
        raise CapstfError(f"Data dir {str(folder)!r} does not exist. {OFFLINE_HINT}")
    real_affnist = affnist_files(folder, split) if data_set(dataset).real_files else []
    if real_affnist:
        return load_affnist(real_affnist)
    images_name, labels_name = IDX_FILES[split]
    images = read_idx(_find(folder, images_name), IMAGES_MAGIC)
    labels = read_idx(_find(folder, labels_name), LABELS_MAGIC)
    if len(images) != len(labels):
        raise CapstfError(f"{folder}: {len(images)} images but {len(labels)} labels in the "
                          f"{split} split; the two files must belong together.")
    if labels.max(initial=0) > 9:
        raise CapstfError(f"{folder}/{labels_name}: labels must be digits 0..9, found {labels.max()}.")
    return Examples(images, labels.astype(np.int32))


def load_training_split(data_dir: str, dataset: str = "mnist", validation_digits: int = 0
                        ) -> Tuple[Examples, Optional[Examples]]:
    """(training examples, validation examples): the training split read once, its last
    `validation_digits` examples held out for validation (None when that is 0)."""
    examples = load_examples(data_dir, "train", dataset)
    if not validation_digits:
        return examples, None
    if not 0 < validation_digits < len(examples.labels):
        raise CapstfError(f"data.validation_digits={validation_digits}: the training split holds "
                          f"{len(examples.labels)} examples; hold out fewer.")
    held_out = slice(-validation_digits, None)
    kept = slice(None, -validation_digits)
    return (examples._replace(images=examples.images[kept], labels=examples.labels[kept]),
            examples._replace(images=examples.images[held_out], labels=examples.labels[held_out]))


def affnist_files(folder: Path, split: str):
    name = {"train": "training", "test": "test"}[split]
    whole = folder / f"{name}.mat"
    return [whole] if whole.is_file() else sorted((folder / f"{name}_batches").glob("*.mat"))


def load_affnist(paths) -> Examples:
    """Real affNIST .mat files: struct affNISTdata with image [1600, n] and label_int [n]."""
    from scipy.io import loadmat
    images, labels = [], []
    for path in paths:
        try:
            data = loadmat(path, squeeze_me=True, struct_as_record=False)["affNISTdata"]
            pixels = np.asarray(data.image, np.uint8).T.reshape(-1, 40, 40)  # each column: a row-major image
            label = np.atleast_1d(np.asarray(data.label_int)).astype(np.int32)
        except Exception as e:  # scipy raises many types for a damaged or foreign file
            raise CapstfError(f"{path}: not an affNIST .mat file ({type(e).__name__}: {e}).") from None
        if len(pixels) != len(label):
            raise CapstfError(f"{path}: {len(pixels)} images but {len(label)} labels.")
        images.append(pixels)
        labels.append(label)
    return Examples(np.concatenate(images), np.concatenate(labels))


def _find(folder: Path, name: str) -> Path:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise CapstfError(f"{folder} has no {name} (or {name}.gz). {OFFLINE_HINT}")


def read_idx(path: Path, magic: int) -> np.ndarray:
    """Reads an IDX file (raw or gzipped), checking magic number, header and size."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as e:  # zlib.error: a damaged compressed body
        raise CapstfError(f"{path}: cannot read ({e}); the file is corrupt or truncated.") from None
    ndim = {IMAGES_MAGIC: 3, LABELS_MAGIC: 1}[magic]
    header = 4 + 4 * ndim
    if len(raw) < header or struct.unpack(">I", raw[:4])[0] != magic:
        raise CapstfError(f"{path}: not an MNIST IDX {'image' if ndim == 3 else 'label'} file "
                          f"(expected magic number {magic}).")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    if ndim == 3 and shape[1:] != (28, 28):
        raise CapstfError(f"{path}: images are {shape[1]}x{shape[2]}, expected 28x28.")
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        raise CapstfError(f"{path}: holds {len(raw)} bytes, its header promises {expected}; "
                          "the file is truncated or corrupt.")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


def _tfds():
    import tensorflow_datasets as tfds  # slow import: only when asked for
    return tfds


def _builder(name: str, data_dir: str):
    try:
        return _tfds().builder(name, data_dir=data_dir or None)
    except Exception as e:  # DatasetNotFoundError, a bad config name, ...: all mean "no such data set"
        raise CapstfError(f"TFDS has no data set {name!r} ({first_line(e)}).") from None


def tfds_images(dataset: str, data_dir: str = "") -> TfdsImages:
    """The TFDS features behind a capstf data set: a fixed choice for smallnorb, cifar10 and
    svhn; for tfds:NAME[:CONFIG], its one image feature and its class label ("label" if
    several)."""
    if data_set(dataset).tfds:
        return data_set(dataset).tfds
    name = dataset[len(TFDS_PREFIX):].replace(":", "/")  # TFDS spells a config NAME/CONFIG
    tfds = _tfds()
    features = _builder(name, data_dir).info.features
    images = [key for key, f in features.items() if isinstance(f, tfds.features.Image)]
    labels = [key for key, f in features.items() if isinstance(f, tfds.features.ClassLabel)]
    label = "label" if "label" in labels else labels[0] if len(labels) == 1 else None
    if len(images) != 1 or label is None:
        raise CapstfError(f"{dataset}: capstf needs one image and one class label feature; TFDS gives "
                          f"{name} the features {', '.join(sorted(features.keys()))}.")
    shape = features[images[0]].shape
    if None in shape:
        raise CapstfError(f"{dataset}: its images have no fixed size ({shape}); capstf needs one.")
    if shape[0] != shape[1]:
        raise CapstfError(f"{dataset}: its images are {shape[0]}x{shape[1]}; capstf's model takes square ones.")
    return TfdsImages(name, (images[0],), label)


def load_tfds(source: TfdsImages, split: str, data_dir: str) -> Examples:
    """One split of a TFDS data set as Examples(images [n, H, W, C], ...).

    Offline, a data set TFDS has not prepared fails at once with a clear error: TFDS itself
    would retry the download for minutes first.
    """
    tfds = _tfds()
    import tensorflow as tf
    builder = _builder(source.name, data_dir)
    try:
        data = builder.as_dataset(split=split)
    except AssertionError:  # TFDS's word for "not prepared"
        if not _reachable("storage.googleapis.com"):
            raise RuntimeFailure(
                f"TFDS has no prepared copy of {source.name} in {builder.data_dir_root}, and cannot reach "
                f"storage.googleapis.com to download it. Prepare it where there is network (`tfds build "
                f"{source.name}`) and pass that TFDS data dir as --data-dir."
                + (f" {OFFLINE_HINT}" if source.name == "mnist" else "")) from None
        try:
            builder.download_and_prepare()
            data = builder.as_dataset(split=split)
        except Exception as e:  # TFDS raises many types; all mean "no data"
            raise RuntimeFailure(f"TFDS could not prepare {source.name} ({type(e).__name__}: {e}).") from None
    except ValueError as e:  # an unknown split
        raise CapstfError(f"TFDS's {source.name} has no {split!r} split ({e}).") from None

    def example(features):  # -> ([H, W, C] uint8, label): the image features stacked as channels
        image = tf.concat([features[key] for key in source.image_features], axis=-1)
        if source.resize_to:
            image = tf.image.resize(image, [source.resize_to] * 2, method="area")
            image = tf.cast(tf.round(image), tf.uint8)
        return image, tf.cast(features[source.label_feature], tf.int32)

    images, labels = [], []
    for image, label in tfds.as_numpy(data.map(example, num_parallel_calls=tf.data.AUTOTUNE).batch(4096)):
        images.append(image)
        labels.append(label)
    if not labels:
        raise CapstfError(f"TFDS's {source.name} {split} split is empty.")
    num_classes = builder.info.features[source.label_feature].num_classes
    return Examples(np.concatenate(images), np.concatenate(labels), num_classes)


def _reachable(host: str) -> bool:
    try:
        socket.create_connection((host, 443), timeout=3).close()
        return True
    except OSError:
        return False
