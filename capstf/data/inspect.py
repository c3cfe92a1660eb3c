"""`capstf data`: generated examples as .npz, and a contact sheet to look at."""
import numpy as np

from capstf.errors import CapstfError
from capstf.files import write_atomically


def write_examples(dataset, data_dir, split, count, seed, out, png=None) -> dict:
    """Generates `count` examples with the settings of the data set's recipe and saves them."""
    from capstf import config as config_lib
    from capstf.catalog import data_set
    from capstf.data.datasets import make_dataset
    from capstf.data.sources import load_examples
    if count < 1:
        raise CapstfError("--count must be at least 1.")
    cfg = config_lib.resolve(data_set(dataset).recipe, {"data.dataset": dataset, "data.data_dir": data_dir})
    examples = load_examples(cfg.data.data_dir, split, dataset)
    batch = next(iter(make_dataset(cfg.data, examples, split, count, seed, limit=count)))
    arrays = {k: v.numpy() for k, v in batch.items()}
    saved = {"images": arrays["image"], "labels": arrays["label"],
             **({"components": arrays["components"]} if "components" in arrays else {})}

    def write_npz(scratch):
        with scratch.open("wb") as f:  # a file, not a name: np.savez would add ".npz" to other names
            np.savez_compressed(f, **saved)
    write_atomically(out, write_npz)
    if png:
        write_atomically(png, lambda scratch: contact_sheet(arrays["image"]).save(scratch, format="PNG"))
    return {"out": str(out), "png": png, "count": len(arrays["label"]), "shape": list(arrays["image"].shape)}


def viewable(image) -> np.ndarray:
    """An image [H, W] or [H, W, C], floats in [0, 1] -> uint8 RGB [H, W', 3]: grey (C = 1),
    colour (C = 3), or a stereo pair's two views side by side (C = 2, smallNORB; W' = 2W)."""
    pixels = np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)
    pixels = pixels[..., None] if pixels.ndim == 2 else pixels
    if pixels.shape[-1] == 2:
        pixels = np.concatenate([pixels[..., :1], pixels[..., 1:]], axis=1)
    return np.repeat(pixels, 3, axis=-1) if pixels.shape[-1] == 1 else pixels


def contact_sheet(images, columns=16, gap=2):
    """[n, H, W, C] floats in [0, 1] -> an RGB PIL image of them in a grid (see `viewable`)."""
    from PIL import Image
    tiles = [viewable(image) for image in images]
    h, w = tiles[0].shape[:2]
    rows = -(-len(tiles) // columns)
    cols = min(len(tiles), columns)
    sheet = np.full((rows * (h + gap) + gap, cols * (w + gap) + gap, 3), 64, np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        y, x = gap + r * (h + gap), gap + c * (w + gap)
        sheet[y:y + h, x:x + w] = tile
    return Image.fromarray(sheet, mode="RGB")
