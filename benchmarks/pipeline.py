"""Examples/s of each tf.data pipeline on this machine, and MultiMNIST bounding-box overlap, as JSON.

    python benchmarks/pipeline.py [--batches 40] [--batch 128]

MNIST-based sets use the bundled sample digits; the TFDS image sets (smallnorb, cifar10, svhn)
random pixels of their real sizes and counts (the pipeline's cost does not depend on the
pixels, and this machine cannot download them). The pipeline must never limit training:
compare each figure with the images/s of benchmarks/train_step.py (aim: at least 20x).
"""
import argparse
import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from capstf import config as config_lib  # noqa: E402
from capstf.data.datasets import ink_box, make_dataset  # noqa: E402
from capstf.data.sources import Examples, load_examples  # noqa: E402

RUNS = [("mnist", "mnist", "train"), ("multimnist", "multimnist", "train"), ("multimnist", "multimnist", "test"),
        ("expanded-mnist", "expanded-mnist", "train"), ("affnist", "expanded-mnist", "test"),
        ("smallnorb", "smallnorb", "train"), ("cifar10", "cifar10", "train"), ("cifar10", "cifar10", "test"),
        ("svhn", "svhn", "train")]
TFDS_SHAPES = {"smallnorb": (24300, 48, 48, 2, 5), "cifar10": (50000, 32, 32, 3, 10),  # as loaded: n, H, W, C, classes
               "svhn": (73257, 32, 32, 3, 10)}


def random_examples(dataset):
    n, h, w, c, classes = TFDS_SHAPES[dataset]
    rng = np.random.default_rng(0)
    return Examples(rng.integers(0, 256, [n, h, w, c], np.uint8), rng.integers(0, classes, n).astype(np.int32), classes)


def bbox_overlap(components):
    """Mean overlap of the two digits' ink boxes: intersection over union, and over the smaller box."""
    boxes = ink_box(tf.reshape(components, [-1, *components.shape[2:4]])).numpy().reshape(-1, 2, 4)
    a, b = boxes[:, 0].astype(float), boxes[:, 1].astype(float)
    height = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]) + 1, 0, None)
    width = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]) + 1, 0, None)
    area = lambda box: (box[:, 2] - box[:, 0] + 1) * (box[:, 3] - box[:, 1] + 1)
    inter = height * width
    return {"iou": float(np.mean(inter / (area(a) + area(b) - inter))),
            "over_smaller_box": float(np.mean(inter / np.minimum(area(a), area(b))))}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()
    digits = {split: load_examples("sample", split) for split in ("train", "test")}
    results = {"batch": args.batch, "examples_per_s": {}}
    for dataset, recipe, split in RUNS:
        cfg = config_lib.resolve(recipe, {"data.dataset": dataset})
        examples = random_examples(dataset) if dataset in TFDS_SHAPES else digits[split]
        it = iter(make_dataset(cfg.data, examples, split, args.batch, seed=0).repeat())
        first = next(it)  # builds and warms the pipeline
        start = time.perf_counter()
        for _ in range(args.batches):
            batch = next(it)
        results["examples_per_s"][f"{dataset}/{split}"] = round(args.batch * args.batches / (time.perf_counter() - start))
        if dataset == "multimnist" and split == "train":
            results["multimnist_bbox_overlap"] = bbox_overlap(tf.concat([first["components"], batch["components"]], 0)[..., 0])
    print(json.dumps(results))


if __name__ == "__main__":
    main()
