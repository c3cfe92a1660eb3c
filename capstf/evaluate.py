"""The paper's metrics: accuracy, and for MultiMNIST the both-digits-correct accuracy."""
import json
from pathlib import Path

import tensorflow as tf

from capstf import config as config_lib
from capstf.data.datasets import SPECS, make_dataset, num_examples, spec
from capstf.data.sources import load_digits
from capstf.errors import CapstfError
from capstf.model.losses import multi_hot


def exact_match(probabilities, labels):
    """[batch] bool: the k highest scores are exactly the k labels (k = 1 or 2 digits).

    For MultiMNIST this is the paper's rule: both longest capsules must be the true classes.
    """
    labels = tf.reshape(labels, [tf.shape(labels)[0], -1])
    num_classes = probabilities.shape[-1]
    predicted = multi_hot(tf.math.top_k(probabilities, labels.shape[1]).indices, num_classes)
    return tf.reduce_all(tf.equal(predicted, multi_hot(labels, num_classes)), axis=-1)


def score(model, dataset) -> dict:
    """Runs the model over a finite dataset; returns accuracy, error and the example count."""
    @tf.function
    def count(batch):
        out = model(batch["image"], training=False)
        return tf.reduce_sum(tf.cast(exact_match(out["probabilities"], batch["label"]), tf.int64))

    correct = total = 0
    for batch in dataset:
        correct += int(count(batch))
        total += int(tf.shape(batch["label"])[0])
    if total == 0:
        raise CapstfError("The evaluation data set is empty.")
    return {"accuracy": correct / total, "error": 1 - correct / total, "examples": total}


def check_dataset_fits(cfg, dataset, model_dir):
    """A model takes only data sets of its canvas size and digits per image."""
    if dataset not in SPECS:
        raise CapstfError(f"Unknown data set {dataset!r}; choose one of {', '.join(SPECS)}.")
    if spec(dataset).canvas != cfg.model.input_size or spec(dataset).digits_per_image != cfg.model.digits_per_image:
        raise CapstfError(f"{model_dir} holds a model trained on {cfg.data.dataset} "
                          f"({cfg.model.input_size}x{cfg.model.input_size}); it cannot take {dataset}.")


def evaluate(model_dir, dataset=None, data_dir=None, split="test", limit=0,
             partners_per_digit=None, batch_size=100) -> dict:
    """Restores the newest checkpoint in model_dir and scores it; writes eval_<dataset>_<split>.json."""
    from capstf.train import restore_for_inference  # train imports this module
    model_dir = Path(model_dir)
    cfg = config_lib.load_saved(model_dir)
    dataset = dataset or cfg.data.dataset
    check_dataset_fits(cfg, dataset, model_dir)
    cfg.data.dataset = dataset
    if data_dir is not None:
        cfg.data.data_dir = data_dir
    if partners_per_digit:
        cfg.data.partners_per_digit = partners_per_digit
    model, step = restore_for_inference(model_dir, cfg)
    digits = load_digits(cfg.data.data_dir, split, dataset)
    data = make_dataset(cfg.data, digits, split, batch_size, cfg.train.seed, limit=limit)
    metrics = {"dataset": dataset, "split": split, "step": step, **score(model, data)}
    if dataset == "multimnist":
        metrics["partners_per_digit"] = cfg.data.partners_per_digit
        metrics["both_correct_accuracy"] = metrics["accuracy"]
    metrics["available_examples"] = num_examples(cfg.data, digits, split)
    (model_dir / f"eval_{dataset}_{split}.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics
