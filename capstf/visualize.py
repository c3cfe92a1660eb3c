"""`capstf visualize`: the paper's figures 3, 4 and 5 as PNG files (drawn by capstf.sheets)."""
import numpy as np
import tensorflow as tf

from capstf import config as config_lib
from capstf.checkpoints import restore_for_inference
from capstf.data.datasets import make_dataset
from capstf.data.sources import load_examples
from capstf.errors import CapstfError
from capstf.evaluate import check_dataset_fits
from capstf.files import write_atomically
from capstf.sheets import grid, overlay_sheet, predict_batch, reconstruction_sheet, tile

PERTURBATIONS = np.round(np.arange(-0.25, 0.2501, 0.05), 2)  # the paper's Figure 4 range


# --------------------------------------------------------------------------- the commands

def _load(model_dir, dataset, data_dir):
    cfg = config_lib.load_saved(model_dir)
    check_dataset_fits(cfg, dataset or cfg.data.dataset, model_dir)
    cfg = cfg.with_settings({"data.dataset": dataset or cfg.data.dataset,
                             "data.data_dir": cfg.data.data_dir if data_dir is None else data_dir})
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
    decoded_grid = tf.reshape(decoded, [dims, len(PERTURBATIONS), *decoded.shape[1:]]).numpy()
    tiles = [tile(image) for row in decoded_grid for image in row]
    info = _save(grid(tiles, len(PERTURBATIONS)), out)
    return {**info, "rows": dims, "columns": len(PERTURBATIONS), "digit_class": top}, decoded_grid


def multimnist(model_dir, out, dataset=None, data_dir=None, count=16):
    """Figure 5 on MultiMNIST test pairs: both reconstructions overlaid, wrong ones framed in red."""
    cfg, model = _load(model_dir, dataset, data_dir)
    if cfg.model.digits_per_image != 2:
        raise CapstfError(f"{model_dir} holds a model for {cfg.data.dataset}, not multimnist.")
    batch = next(iter(_examples(cfg, count)))
    result, labels, predictions = predict_batch(model, 2, batch)
    return _save(overlay_sheet(batch["image"].numpy()[:count], result["reconstructions"].numpy()[:count],
                               labels[:count], predictions[:count]), out)
