"""`capstf data`: generated examples as .npz, and a contact sheet to look at."""
from pathlib import Path

import numpy as np

from capstf.errors import CapstfError

RECIPE_OF = {"affnist": "expanded-mnist"}  # affNIST is the test set of that experiment


def write_examples(dataset, data_dir, split, count, seed, out, png=None) -> dict:
    """Generates `count` examples with the settings of the data set's recipe and saves them."""
    from capstf import config as config_lib
    from capstf.data.datasets import make_dataset
    from capstf.data.sources import load_digits
    if count < 1:
        raise CapstfError("--count must be at least 1.")
    cfg = config_lib.resolve(RECIPE_OF.get(dataset, dataset), {"data.dataset": dataset, "data.data_dir": data_dir})
    digits = load_digits(cfg.data.data_dir, split, dataset)
    batch = next(iter(make_dataset(cfg.data, digits, split, count, seed, limit=count)))
    arrays = {k: v.numpy() for k, v in batch.items()}
    _writable(out)
    np.savez_compressed(out, images=arrays["image"], labels=arrays["label"],
                        **({"components": arrays["components"]} if "components" in arrays else {}))
    if png:
        _writable(png)
        contact_sheet(arrays["image"]).save(png)
    return {"out": str(out), "png": png, "count": len(arrays["label"]), "shape": list(arrays["image"].shape)}


def _writable(path):
    folder = Path(path).resolve().parent
    if not folder.is_dir():
        raise CapstfError(f"Cannot write {path}: folder {folder} does not exist.")


def contact_sheet(images, columns=16, gap=2):
    """[n, H, W, 1] floats in [0, 1] -> a grayscale PIL image of them in a grid."""
    from PIL import Image
    n, h, w = images.shape[:3]
    rows = -(-n // columns)
    cols = min(n, columns)
    sheet = np.full((rows * (h + gap) + gap, cols * (w + gap) + gap), 64, np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        y, x = gap + r * (h + gap), gap + c * (w + gap)
        sheet[y:y + h, x:x + w] = np.round(image[..., 0] * 255).astype(np.uint8)
    return Image.fromarray(sheet, mode="L")
