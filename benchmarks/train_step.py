"""Images/s of one full optimizer step (paper CapsNet with decoder, r=3, batch 128), as JSON.

    python benchmarks/train_step.py [--models 28,36,smallnorb,cifar10,svhn] [--rounds 4] [--variants ...]
                                    [--steps-per-call N]

A model is a size (the MNIST model on NxN grey inputs: 28 MNIST, 36 MultiMNIST) or a recipe
whose model it takes (smallnorb: 32x32x2 inputs, 5 classes; cifar10: 24x24x3, 64 primary
capsule types, none-of-the-above routing; svhn: the smaller 32x32x3 model).

Variants (each timed in turn, several rounds) are every combination of what `capstf train`
chooses per device: the compiled part (xla_routing: the capsule layers after the convolutions,
`--jit routing`; plain: graph mode; xla_step: the whole step), the convolutions' precision
(float32, bf16, fp16), their gradients (capstf's forward convolutions, or tf_conv_gradients:
TensorFlow's own) and the routing gradients (all, or the final_routing_gradients shortcut). A
name says how a variant differs from xla_routing (float32, forward-convolution gradients, all
routing gradients): e.g. bf16_tf_conv_gradients. The default set is the CPU candidates;
`--variants all` times every one. The JSON names the variant `capstf train` picks here
(`default_variant`). The profile times, at 28x28 float32, the forward pass, forward+backward,
the routing alone and the optimizer update, to show where a step's time goes. With
--steps-per-call N each timed call trains N steps (`capstf train --steps-per-call`), and images/s
counts all N.

Absolute times drift 2-3x on shared machines, so where ../shared/bench/reference_step.py exists
(or --reference PATH), it runs once between rounds and the JSON gives our 28x28 images/s as
ratios to it (best to best, median to median).
"""
import argparse
import dataclasses
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import tensorflow as tf  # noqa: E402

from capstf import config as config_lib, cpu  # noqa: E402
from capstf.config import Config, DataConfig, ModelConfig, TrainConfig  # noqa: E402
from capstf.layers import route_by_agreement  # noqa: E402
from capstf.train import build_state, device_defaults, make_strategy, make_train_call  # noqa: E402

JITS = ("routing", "off", "step")
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")


def variant_name(jit, precision, forward_conv_gradients, routing_gradients):
    """("routing", "float32", True, "all"), capstf's first default, is "xla_routing"; every
    other variant names how it differs: e.g. "bf16_tf_conv_gradients"."""
    parts = [{"routing": "", "off": "plain", "step": "xla_step"}[jit],
             {"float32": "", "mixed_bfloat16": "bf16", "mixed_float16": "fp16"}[precision],
             "" if forward_conv_gradients else "tf_conv_gradients",
             "" if routing_gradients == "all" else f"{routing_gradients}_routing_gradients"]
    return "_".join(p for p in parts if p) or "xla_routing"


VARIANTS = {variant_name(*v): v  # name -> (jit, precision, forward_conv_gradients, routing_gradients)
            for v in itertools.product(JITS, PRECISIONS, (True, False), config_lib.ROUTING_GRADIENTS)}
# The CPU candidates that `device_defaults` chooses between; name others, or "all", with --variants.
DEFAULT_VARIANTS = "xla_routing,tf_conv_gradients,bf16,bf16_tf_conv_gradients"


def timed(fn, steps, warmup=2):
    for _ in range(warmup):
        tf.nest.map_structure(lambda t: t.numpy(), fn())
    start = time.perf_counter()
    for _ in range(steps):
        tf.nest.map_structure(lambda t: t.numpy(), fn())
    return (time.perf_counter() - start) / steps


def model_config(name, routing_gradients="all"):
    """"28" -> the MNIST model on 28x28 inputs; "cifar10" -> recipe cifar10's model."""
    model = ModelConfig(input_size=int(name)) if name.isdigit() else config_lib.resolve(name).model
    return dataclasses.replace(model, routing_gradients=routing_gradients)


def setup(model_cfg, jit, precision, batch, forward_conv_gradients=True):
    cfg = Config(DataConfig(), model_cfg, TrainConfig(batch_size=batch, jit=jit, precision=precision))
    strategy = make_strategy("one-device")  # the device defaults `capstf train` uses
    with strategy.scope():
        model, optimizer, _ = build_state(cfg, jit, precision, forward_conv_gradients=forward_conv_gradients)
    images = tf.random.uniform([batch, model_cfg.input_size, model_cfg.input_size, model_cfg.channels])
    batch_data = {"image": images, "label": tf.random.uniform([batch], 0, model_cfg.num_classes, tf.int32)}
    data = iter(tf.data.Dataset.from_tensors(batch_data).repeat())
    return model, optimizer, make_train_call(model, optimizer, strategy, batch, jit == "step"), data, batch_data


def profile(batch, steps):
    """Seconds per call of each part of a float32 step at 28x28."""
    model, optimizer, step, data, b = setup(model_config("28"), "routing", "float32", batch)
    variables = model.trainable_variables

    @tf.function
    def forward():
        return model(b["image"], labels=b["label"], training=True)["probabilities"]

    @tf.function
    def forward_backward():
        with tf.GradientTape() as tape:
            out = model(b["image"], labels=b["label"], training=True)
            loss = tf.reduce_mean(model.per_example_losses(out, b)["loss"])
        return tape.gradient(loss, variables)

    grads = [tf.zeros_like(v) for v in variables]
    apply = tf.function(lambda: optimizer.apply_gradients(zip(grads, variables)))
    primary = tf.function(lambda: model.primary(model.conv1(b["image"])))
    u = primary()
    digit = model.digit
    u_hat = tf.reshape(tf.matmul(tf.transpose(u, [1, 0, 2]), digit.w), [u.shape[1], batch, 10, 16])
    routing_xla = tf.function(lambda: route_by_agreement(u_hat, 3)[0], jit_compile=True)
    routing_plain = tf.function(lambda: route_by_agreement(u_hat, 3)[0])
    return {name: round(timed(fn, steps), 4) for name, fn in [
        ("forward_s", forward), ("convolutions_forward_s", primary), ("forward_backward_s", forward_backward),
        ("routing_xla_forward_s", routing_xla), ("routing_plain_forward_s", routing_plain),
        ("optimizer_update_s", apply), ("full_step_s", lambda: step(data))]}


DEFAULT_REFERENCE = Path(__file__).resolve().parents[1] / ".." / "shared" / "bench" / "reference_step.py"


def reference_images_per_s(path):
    out = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["reference_images_per_s"]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="28,36", help="Sizes (the MNIST model) and recipe names, e.g. 28,cifar10.")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=4, help="Timed steps per variant, interleaved.")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"'all', or of: {', '.join(VARIANTS)}.")
    parser.add_argument("--steps-per-call", type=int, default=1, help="Steps in each timed compiled call.")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--reference", default=str(DEFAULT_REFERENCE) if DEFAULT_REFERENCE.exists() else "",
                        help="A reference step script printing reference_images_per_s; '' for none.")
    args = parser.parse_args()
    args.variants = ",".join(VARIANTS) if args.variants == "all" else args.variants
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown --variants {', '.join(sorted(unknown))}; choose from {', '.join(VARIANTS)}")
    # Shared machines drift by 2-3x within minutes: interleave variants, report best and median.
    steps = {}
    for model_name in args.models.split(","):
        label = f"{model_name}x{model_name}" if model_name.isdigit() else model_name
        for name in args.variants.split(","):
            jit, precision, forward_conv_gradients, routing_gradients = VARIANTS[name]
            _, _, step, data, _ = setup(model_config(model_name, routing_gradients), jit, precision, args.batch,
                                        forward_conv_gradients)
            n = args.steps_per_call
            tf.nest.map_structure(lambda t: t.numpy(), step(data, n))  # compile
            steps[f"{label}/{name}"] = (lambda step=step, data=data: step(data, n))
    times = {key: [] for key in steps}
    reference = []
    for round_ in range(args.rounds):
        if args.reference:
            reference.append(reference_images_per_s(args.reference))
        for key, fn in steps.items():
            if "/xla_step" in key and round_ and not tf.config.list_physical_devices("GPU"):  # XLA's CPU convolutions: one slow step is enough
                continue
            times[key].append(timed(fn, 1, warmup=0))
    images = args.batch * args.steps_per_call  # per timed call
    best = {k: round(images / min(v), 1) for k, v in times.items()}
    median = {k: round(images / sorted(v)[len(v) // 2], 1) for k, v in times.items()}
    chosen = device_defaults(TrainConfig())
    results = {"batch": args.batch, "rounds": args.rounds, "steps_per_call": args.steps_per_call,
               "cpu": cpu.describe(), "default_steps_per_call": chosen.steps_per_call,
               "default_variant": variant_name(chosen.jit, chosen.precision, chosen.forward_conv_gradients,
                                               ModelConfig().routing_gradients),
               "images_per_s_best": best, "images_per_s_median": median}
    if reference:
        ref_best, ref_median = max(reference), sorted(reference)[len(reference) // 2]
        results["reference_images_per_s"] = {"best": round(ref_best, 1), "median": round(ref_median, 1)}
        results["ratio_to_reference"] = {
            k: {"best": round(best[k] / ref_best, 2), "median": round(median[k] / ref_median, 2)}
            for k in best if k.startswith("28x28/")}
    if not args.no_profile:
        results["profile_28x28_float32_s"] = profile(args.batch, args.rounds)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
