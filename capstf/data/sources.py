"""Where digits come from: TFDS, a folder of MNIST IDX files, or the bundled sample.

Every source returns the same thing, `Digits(images uint8 [n, 28, 28], labels int32 [n])`, so
the data sets in `datasets.py` never care where the digits came from.
"""
import gzip
import os
import socket
import struct
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np

from capstf.errors import CapstfError, RuntimeFailure

SAMPLE_DIR = Path(__file__).parent / "sample"
IDX_FILES = {  # split -> (images, labels), as MNIST names them
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049
OFFLINE_HINT = ("Use `--data-dir sample` for the bundled 5,000+5,000 real MNIST digits, or "
                "`--data-dir DIR` for a folder with the four MNIST IDX files.")


class Digits(NamedTuple):
    images: np.ndarray  # [n, 28, 28] uint8
    labels: np.ndarray  # [n] int32


def load_digits(data_dir: str, split: str, dataset: str = "mnist", validation_digits: int = 0) -> Digits:
    """Loads one split. `data_dir`: "" or "tfds" for TFDS, "sample", or a folder of IDX files.

    With validation_digits = N, the last N training digits are held out: "train" is the rest,
    "validation" those N (for choosing settings without looking at the test digits).

    For dataset "affnist", a folder holding the real affNIST files (`test.mat` or
    `test_batches/*.mat`; `training.mat` or `training_batches/*.mat`) gives their 40x40
    digits as they are, instead of MNIST digits to be warped on the fly.
    """
    if split in ("train", "validation") and validation_digits:
        digits = load_digits(data_dir, "train", dataset)
        if not 0 < validation_digits < len(digits.labels):
            raise CapstfError(f"data.validation_digits={validation_digits}: the training split holds "
                              f"{len(digits.labels)} digits; hold out fewer.")
        keep = slice(None, -validation_digits) if split == "train" else slice(-validation_digits, None)
        return Digits(digits.images[keep], digits.labels[keep])
    if split == "validation":
        raise CapstfError("This model holds out no validation digits (data.validation_digits = 0); "
                          "use --split train or test.")
    if split not in IDX_FILES:
        raise CapstfError(f"Unknown split {split!r}; use one of {sorted(IDX_FILES)}.")
    if data_dir in ("", "tfds"):
        return _load_tfds(split)
    folder = SAMPLE_DIR if data_dir == "sample" else Path(data_dir)
    if not folder.is_dir():
        raise CapstfError(f"Data dir {str(folder)!r} does not exist. {OFFLINE_HINT}")
    real_affnist = affnist_files(folder, split) if dataset == "affnist" else []
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
    return Digits(images, labels.astype(np.int32))


def affnist_files(folder: Path, split: str):
    name = {"train": "training", "test": "test"}[split]
    whole = folder / f"{name}.mat"
    return [whole] if whole.is_file() else sorted((folder / f"{name}_batches").glob("*.mat"))


def load_affnist(paths) -> Digits:
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
    return Digits(np.concatenate(images), np.concatenate(labels))


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


def _load_tfds(split: str) -> Digits:
    # Offline, tfds.load retries for minutes before failing: check reachability first.
    try:
        socket.create_connection(("storage.googleapis.com", 443), timeout=3).close()
    except OSError:
        tfds_dir = Path(os.environ.get("TFDS_DATA_DIR", Path.home() / "tensorflow_datasets"))
        if not (tfds_dir / "mnist").is_dir():
            raise RuntimeFailure("Cannot reach storage.googleapis.com to download MNIST through "
                              f"TFDS, and {tfds_dir} has no prepared copy. {OFFLINE_HINT}") from None
    import tensorflow_datasets as tfds  # slow import: only when asked for
    try:
        images, labels = tfds.as_numpy(tfds.load("mnist", split=split, batch_size=-1,
                                                 as_supervised=True))
    except Exception as e:  # TFDS raises many types; all mean "no data"
        raise RuntimeFailure(f"TFDS could not load MNIST ({type(e).__name__}: {e}). {OFFLINE_HINT}") from None
    return Digits(images[..., 0].astype(np.uint8), labels.astype(np.int32))
