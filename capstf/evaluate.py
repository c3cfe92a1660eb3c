"""The paper's metrics: accuracy, and for MultiMNIST the both-digits-correct accuracy."""
from pathlib import Path

import tensorflow as tf

from capstf import config as config_lib
from capstf.catalog import data_set
from capstf.checkpoints import restore_for_inference
from capstf.data.datasets import input_canvas, make_dataset, num_examples
from capstf.data.sources import load_examples
from capstf.errors import CapstfError, RuntimeFailure, warn
from capstf.files import write_json
from capstf.metrics import exact_match


def score(model, dataset, should_stop=None) -> dict:
    """Runs the model over a finite dataset; returns accuracy, error and the example count, or
    None if should_stop() turned true between two batches (a training asked to stop)."""
    @tf.function
    def count(batch):
        out = model(batch["image"], training=False)
        return tf.reduce_sum(tf.cast(exact_match(out["probabilities"], batch["label"]), tf.int64))

    correct = total = 0
    for batch in dataset:
        if should_stop is not None and should_stop():
            return None
        correct += int(count(batch))
        total += int(tf.shape(batch["label"])[0])
    if total == 0:
        raise CapstfError("The evaluation data set is empty.")
    return {"accuracy": correct / total, "error": 1 - correct / total, "examples": total}


def check_dataset_fits(cfg, dataset, model_dir, canvas=None):
    """A model takes only data sets of its input size, channels, classes and digits per image.

    canvas: the data set's, if loaded (a tfds:NAME data set's is known only then).
    """
    canvas = canvas or data_set(dataset).canvas
    model = cfg.model
    if canvas and tuple(canvas) != (model.input_size, model.digits_per_image, model.channels, model.num_classes):
        raise CapstfError(f"{model_dir} holds a model trained on {cfg.data.dataset} ({model.input_size}x"
                          f"{model.input_size}x{model.channels}, {model.num_classes} classes); it cannot take "
                          f"{dataset} ({canvas.size}x{canvas.size}x{canvas.channels}, {canvas.num_classes} classes).")


class Ensemble:
    """Several models scored as one: their capsule lengths averaged (the paper's CIFAR10 ensemble)."""

    def __init__(self, models):
        self.models = models

    def __call__(self, images, training=False):
        lengths = [model(images, training=training)["probabilities"] for model in self.models]
        return {"probabilities": tf.add_n(lengths) / len(lengths)}

    def count_params(self):
        return sum(model.count_params() for model in self.models)


def measure(model_dirs, dataset=None, data_dir=None, split="test", limit=0,
            partners_per_digit=None, checkpoint=None, batch_size=100) -> dict:
    """The paper's metrics of a checkpoint (default: the newest) in a model dir, or of an ensemble
    of several model dirs, on a data set (default: the one trained on), as a dict."""
    model_dirs = _as_list(model_dirs)
    if checkpoint and len(model_dirs) > 1:
        raise CapstfError("Name a checkpoint for one model dir, not for an ensemble.")
    configs = [config_lib.load_saved(model_dir) for model_dir in model_dirs]
    cfg = configs[0]
    dataset = dataset or cfg.data.dataset
    for model_dir, model_cfg in zip(model_dirs, configs):
        check_dataset_fits(model_cfg, dataset, model_dir)
    cfg = cfg.with_settings({"data.dataset": dataset, "data.data_dir": cfg.data.data_dir if data_dir is None else data_dir,
                             "data.partners_per_digit": partners_per_digit or cfg.data.partners_per_digit})
    examples = load_examples(cfg.data.data_dir, split, dataset, cfg.data.validation_digits)
    canvas = input_canvas(cfg.data, examples)
    for model_dir, model_cfg in zip(model_dirs, configs):
        check_dataset_fits(model_cfg, dataset, model_dir, canvas)
    restored = [restore_for_inference(d, c, checkpoint) for d, c in zip(model_dirs, configs)]
    model = restored[0][0] if len(restored) == 1 else Ensemble([m for m, _ in restored])
    # Either split is scored as a test set: one deterministic pass, unshifted (central crops).
    data = make_dataset(cfg.data, examples, "test", batch_size, cfg.train.seed, limit=limit)
    metrics = {"dataset": dataset, "split": split, "step": restored[0][1] if len(restored) == 1 else [s for _, s in restored],
               **score(model, data), "parameters": model.count_params()}
    if len(restored) > 1:
        metrics["ensemble"] = [str(d) for d in model_dirs]
    if data_set(dataset).examples == "pair":
        metrics["partners_per_digit"] = cfg.data.partners_per_digit
        metrics["both_correct_accuracy"] = metrics["accuracy"]
    metrics["available_examples"] = num_examples(cfg.data, examples, "test")
    return metrics


def evaluate(model_dirs, dataset=None, data_dir=None, split="test", limit=0, partners_per_digit=None) -> dict:
    """`measure`s the newest checkpoint(s); one model dir also gets eval_<dataset>_<split>.json,
    unless it cannot be written (a read-only or full disk): the metrics are still returned."""
    metrics = measure(model_dirs, dataset, data_dir, split, limit, partners_per_digit)
    if "ensemble" not in metrics:
        model_dir, = _as_list(model_dirs)
        try:
            write_json(model_dir / f"eval_{metrics['dataset']}_{split}.json", metrics)
        except RuntimeFailure as e:
            warn(f"the metrics are not saved: {e}")
    return metrics


def _as_list(model_dirs):
    """One model dir or several -> [Path, ...]."""
    return [Path(model_dirs)] if isinstance(model_dirs, (str, Path)) else [Path(d) for d in model_dirs]
