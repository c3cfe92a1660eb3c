"""The data sets capstf knows, one `DataSet` record each: what the model sees, where the images
come from, how an example is drawn from them and which settings apply to it. Everything that
depends on a data set reads its record here (no TensorFlow: the config checks read it too);
capstf.data.datasets draws each kind of example, capstf.data.sources loads each kind of source.
"""
from typing import NamedTuple, Optional, Tuple

from capstf.errors import CapstfError

TFDS_PREFIX = "tfds:"  # --dataset tfds:NAME[:CONFIG]: any TFDS image classification set, its shape from TFDS


class Canvas(NamedTuple):
    size: int              # height and width of the images the model sees (after any crop)
    digits_per_image: int  # MultiMNIST: 2
    channels: int = 1
    num_classes: int = 10


class TfdsImages(NamedTuple):
    """Which features of a TFDS data set make capstf's examples."""
    name: str                  # TFDS's name[/config]
    image_features: Tuple[str, ...]  # stacked as channels (smallNORB's stereo pair: 2)
    label_feature: str
    resize_to: int = 0         # if > 0, resized (area averaging) to this height and width once, at load


class DataSet(NamedTuple):
    name: str
    canvas: Optional[Canvas]   # None: a tfds:NAME set, whose images give it once they are loaded
    examples: str              # how an example is drawn (capstf.data.datasets): "digit" placed and shifted
                               #   (rotated and scaled on request), "pair" of digits, "affine"-warped
                               #   digit, or "crop" of an image (flipped and jittered on request)
    tfds: Optional[TfdsImages]  # the TFDS images; None: MNIST's digits (an IDX folder, the sample or
                               #   TFDS), or a tfds:NAME set's own features
    recipe: str                # what `capstf train --dataset NAME` trains by default
    trainable: bool = True     # affnist is a test set of models trained on expanded-mnist
    shift_at_test: bool = False  # expanded-mnist: its test digits are placed at random too
    real_files: bool = False   # affnist: real affNIST .mat files in --data-dir are read as they are

    @property
    def digits(self) -> bool:
        """Made of MNIST's digits, as opposed to a TFDS image set."""
        return self.examples != "crop"


DATA_SETS = {d.name: d for d in (
    DataSet("mnist", Canvas(28, 1), "digit", None, "mnist"),
    DataSet("multimnist", Canvas(36, 2), "pair", None, "multimnist"),
    DataSet("expanded-mnist", Canvas(40, 1), "digit", None, "expanded-mnist", shift_at_test=True),
    DataSet("affnist", Canvas(40, 1), "affine", None, "expanded-mnist", trainable=False, real_files=True),
    # 32x32 crops of the stereo pair at 48x48
    DataSet("smallnorb", Canvas(32, 1, channels=2, num_classes=5), "crop",
            TfdsImages("smallnorb", ("image", "image2"), "label_category", resize_to=48), "smallnorb"),
    DataSet("cifar10", Canvas(24, 1, channels=3), "crop", TfdsImages("cifar10", ("image",), "label"), "cifar10"),
    # the 73,257 training images, not "extra"
    DataSet("svhn", Canvas(32, 1, channels=3), "crop", TfdsImages("svhn_cropped", ("image",), "label"), "svhn"),
)}
TRAINABLE = tuple(name for name, d in DATA_SETS.items() if d.trainable)
IMAGE_SETS = tuple(name for name, d in DATA_SETS.items() if not d.digits)


def is_tfds_name(dataset: str) -> bool:
    return dataset.startswith(TFDS_PREFIX) and len(dataset) > len(TFDS_PREFIX)


def check_dataset_name(dataset: str, allowed=tuple(DATA_SETS)):
    """A data set name is one of `allowed` or tfds:NAME[:CONFIG]; anything else is refused."""
    if dataset not in allowed and not is_tfds_name(dataset):
        raise CapstfError(f"Unknown data set {dataset!r}; choose one of {', '.join(allowed)}, or "
                          f"{TFDS_PREFIX}NAME[:CONFIG] for a TensorFlow Datasets image classification set.")


def data_set(name: str) -> DataSet:
    """The record of data set `name` (a tfds:NAME set: cropped images, shape and features from TFDS)."""
    check_dataset_name(name)
    return DATA_SETS.get(name) or DataSet(name, None, "crop", None, "tfds")
