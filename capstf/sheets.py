"""Contact sheets of images and their reconstructions, drawn with Pillow: the paper's Figures 3
and 5, and their tiles and grid. `capstf visualize` writes them as PNG; training logs Figure 3's
sheet to TensorBoard."""
import numpy as np
import tensorflow as tf
from PIL import Image, ImageDraw

from capstf.data.inspect import viewable

SCALE = 3        # pixels per image pixel
CAPTION = 12     # caption height in pixels


def tile(image) -> Image.Image:
    """[H, W, C] floats in [0, 1] -> an RGB tile (grey, colour or a stereo pair), SCALE times larger."""
    pixels = viewable(image)
    return Image.fromarray(pixels, "RGB").resize((pixels.shape[1] * SCALE, pixels.shape[0] * SCALE), Image.NEAREST)


def grid(tiles, columns, captions=None, flags=None) -> Image.Image:
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
        above, below = tile(image), tile(np.minimum(recon.sum(0), 1))
        pair = Image.new("RGB", (above.width, 2 * above.height))
        pair.paste(above, (0, 0))
        pair.paste(below, (0, above.height))
        tiles.append(pair)
        fmt = lambda v: "".join(map(str, v))
        captions.append(f"({fmt(label)},{fmt(pred)},{fmt(pred)})")
        flags.append(set(label.tolist()) != set(pred.tolist()))
    return grid(tiles, min(len(tiles), 10), captions, flags)


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
    return grid(tiles, min(len(tiles), 8), captions, flags)


def predict_batch(model, k, batch):
    """(model outputs, labels [n, k], the k longest capsules [n, k]) for a batch."""
    out = model(batch["image"])
    predictions = tf.math.top_k(out["probabilities"], k).indices.numpy()
    labels = tf.reshape(batch["label"], [len(predictions), -1]).numpy()
    return out, labels, predictions
