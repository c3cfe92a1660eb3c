"""`capstf visualize`: the paper's figures 3, 4 and 5 as PNG files, drawn with Pillow."""
import numpy as np
import tensorflow as tf
from PIL import Image, ImageDraw

from capstf import config as config_lib
from capstf.checkpoints import restore_for_inference
from capstf.data.datasets import make_dataset
from capstf.data.inspect import viewable
from capstf.data.sources import load_examples
from capstf.errors import CapstfError
from capstf.evaluate import check_dataset_fits
from capstf.files import write_atomically

SCALE = 3        # pixels per image pixel
CAPTION = 12     # caption height in pixels
PERTURBATIONS = np.round(np.arange(-0.25, 0.2501, 0.05), 2)  # the paper's Figure 4 range


# ------------------------------------------------------------------------------ drawing

def _tile(image) -> Image.Image:
    """[H, W, C] floats in [0, 1] -> an RGB tile (grey, colour or a stereo pair), SCALE times larger."""
    pixels = viewable(image)
    return Image.fromarray(pixels, "RGB").resize((pixels.shape[1] * SCALE, pixels.shape[0] * SCALE), Image.NEAREST)


def _grid(tiles, columns, captions=None, flags=None) -> Image.Image:
    """Tiles (equal-size PIL images) in rows of `columns`, optional captions; flagged ones in red."""
    w, h = tiles[0].size
    cell_h = h + (CAPTION if captions else 0)
    rows = -(-len(tiles) // columns)
    sheet = Image.new("RGB", (columns * (w + 2) + 2, rows * (cell_h + 2) + 2), (40, 40, 40))
    draw = ImageDraw.Draw(sheet)
    for i, tile in enumerate(tiles):
        x, y = 2 + (i % columns) * (w + 2), 2 + (i // columns) * (cell_h + 2)
        sheet.paste(tile, (x, y))
        color = (255, 80, 80) if flags is not None and flags[i] else (230, 230, 230)
        if flags is not None and flags[i]:
            draw.rectangle([x, y, x + w - 1, y + h - 1], outline=color)
        if captions:
            draw.text((x + 1, y + h), captions[i], fill=color)
    return sheet


def reconstruction_sheet(images, reconstructions, labels, predictions):
    """Figure 3: each input above its reconstruction, captioned (label, prediction, target).

    Args:
      images: [n, H, W, C]; reconstructions: [n, k, H, W, C] (k digits, overlaid).
      labels, predictions: [n, k] ints. The reconstruction target is the prediction.
    """
    tiles, captions, flags = [], [], []
    for image, recon, label, pred in zip(images, reconstructions, labels, predictions):
        above, below = _tile(image), _tile(np.minimum(recon.sum(0), 1))
        pair = Image.new("RGB", (above.width, 2 * above.height))
        pair.paste(above, (0, 0))
        pair.paste(below, (0, above.height))
        tiles.append(pair)
        fmt = lambda v: "".join(map(str, v))
        captions.append(f"({fmt(label)},{fmt(pred)},{fmt(pred)})")
        flags.append(set(label.tolist()) != set(pred.tolist()))
    return _grid(tiles, min(len(tiles), 10), captions, flags)


def overlay_sheet(images, reconstructions, labels, predictions):
    """Figure 5: inputs (gray) with the two reconstructed digits in red and green; wrong ones framed."""
    tiles, captions, flags = [], [], []
    for image, recon, label, pred in zip(images, reconstructions, labels, predictions):
        base = np.squeeze(image)[..., None] * 0.35
        rgb = np.clip(base + np.stack([np.squeeze(recon[0]), np.squeeze(recon[1]), np.zeros_like(base[..., 0])], -1), 0, 1)
        tile = Image.fromarray(np.round(rgb * 255).astype(np.uint8), "RGB")
        tiles.append(tile.resize((tile.width * SCALE, tile.height * SCALE), Image.NEAREST))
        captions.append(f"L:{label[0]}{label[1]} P:{pred[0]}{pred[1]}")
        flags.append(set(label.tolist()) != set(pred.tolist()))
    return _grid(tiles, min(len(tiles), 8), captions, flags)


# --------------------------------------------------------------------------- the commands

def _load(model_dir, dataset, data_dir):
    cfg = config_lib.load_saved(model_dir)
    check_dataset_fits(cfg, dataset or cfg.data.dataset, model_dir)
    cfg.data.dataset = dataset or cfg.data.dataset
    if data_dir is not None:
        cfg.data.data_dir = data_dir
    if cfg.model.kind != "capsnet" or not cfg.model.decoder:
        raise CapstfError(f"{model_dir} holds a model without a reconstruction decoder; nothing to draw.")
    model, _ = restore_for_inference(model_dir, cfg)
    return cfg, model


def _examples(cfg, count, seed=0):
    examples = load_examples(cfg.data.data_dir, "test", cfg.data.dataset)
    return make_dataset(cfg.data, examples, "test", 100, seed, limit=max(count * 50, 500))


def _save(image, out):
    write_atomically(out, lambda scratch: image.save(scratch, format="PNG"))
    return {"out": str(out), "width": image.width, "height": image.height}


def predict_batch(model, k, batch):
    """(model outputs, labels [n, k], the k longest capsules [n, k]) for a batch."""
    out = model(batch["image"])
    predictions = tf.math.top_k(out["probabilities"], k).indices.numpy()
    labels = tf.reshape(batch["label"], [len(predictions), -1]).numpy()
    return out, labels, predictions


def reconstructions(model_dir, out, dataset=None, data_dir=None, count=20):
    """Figure 3 for `count` test digits, misclassified ones first (up to half)."""
    cfg, model = _load(model_dir, dataset, data_dir)
    wrong, right = [], []
    for batch in _examples(cfg, count):
        result, labels, predictions = predict_batch(model, cfg.model.digits_per_image, batch)
        for i in range(len(labels)):
            item = (batch["image"][i].numpy(), result["reconstructions"][i].numpy(), labels[i], predictions[i])
            (wrong if set(labels[i]) != set(predictions[i]) else right).append(item)
        if len(right) >= count and len(wrong) >= count // 2:
            break
    chosen = wrong[:count // 2] + right[:count - min(len(wrong), count // 2)]
    return _save(reconstruction_sheet(*map(np.stack, zip(*chosen))), out)


def perturbations(model_dir, out, dataset=None, data_dir=None, index=0):
    """Figure 4: each dimension of one digit's capsule moved over PERTURBATIONS, decoded.

    Returns the decoded grid too: [dims, len(PERTURBATIONS), H, W, C].
    """
    cfg, model = _load(model_dir, dataset, data_dir)
    batch = next(iter(_examples(cfg, 1)))
    image = batch["image"][index:index + 1]
    result = model(image)
    top = int(tf.argmax(result["probabilities"][0]))
    capsule = result["capsules"][0, top]  # [dim]
    dims = capsule.shape[0]
    offsets = tf.constant(PERTURBATIONS, tf.float32)
    moved = capsule + tf.eye(dims)[:, None, :] * offsets[None, :, None]  # [dims, steps, dim]
    capsules = tf.scatter_nd([[top]], [tf.reshape(moved, [-1, dims])], [cfg.model.num_classes, dims * len(PERTURBATIONS), dims])
    capsules = tf.transpose(capsules, [1, 0, 2])  # [dims * steps, classes, dim]
    decoded = model.reconstruct(capsules, tf.fill([dims * len(PERTURBATIONS), 1], top))[:, 0]
    grid = tf.reshape(decoded, [dims, len(PERTURBATIONS), *decoded.shape[1:]]).numpy()
    tiles = [_tile(tile) for row in grid for tile in row]
    info = _save(_grid(tiles, len(PERTURBATIONS)), out)
    return {**info, "rows": dims, "columns": len(PERTURBATIONS), "digit_class": top}, grid


def multimnist(model_dir, out, dataset=None, data_dir=None, count=16):
    """Figure 5 on MultiMNIST test pairs: both reconstructions overlaid, wrong ones framed in red."""
    cfg, model = _load(model_dir, dataset, data_dir)
    if cfg.model.digits_per_image != 2:
        raise CapstfError(f"{model_dir} holds a model for {cfg.data.dataset}, not multimnist.")
    batch = next(iter(_examples(cfg, count)))
    result, labels, predictions = predict_batch(model, 2, batch)
    return _save(overlay_sheet(batch["image"].numpy()[:count], result["reconstructions"].numpy()[:count],
                               labels[:count], predictions[:count]), out)
