"""Kills a real `capstf train` run again and again and checks that nothing is lost. Prints JSON.

    python benchmarks/faults.py [--steps 1500] [--checkpoint-every 25] [--kills 10] [--terms 5] [--seed 0]

A small CapsNet trains on the bundled digits. It is interrupted with SIGKILL at `--kills` random
moments and with SIGTERM at `--terms` more, each time resumed by the same command, until it
finishes. Reported: the interruptions survived, the steps lost per interruption (the steps
trained since the last checkpoint; at most one checkpoint interval for SIGKILL, none for
SIGTERM), and whether the final weights equal those of the same run left alone.
"""
import argparse
import json
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def command(model_dir, args):
    return [sys.executable, "-m", "capstf.cli", "train", "--dataset", "mnist", "--data-dir", "sample",
            "--model-dir", str(model_dir), "--steps", str(args.steps), "--batch-size", "16",
            "--checkpoint-every", str(args.checkpoint_every), "--precision", "float32", "--seed", str(args.seed),
            "--set", "model.conv1_filters=16", "--set", "model.primary_caps_types=4", "--set", "train.log_every=1"]


def trained_step(model_dir):
    """The step the run had reached: the newest TensorBoard scalar."""
    import tensorflow as tf
    newest = 0
    for events in Path(model_dir, "train").glob("events*"):
        try:
            for event in tf.compat.v1.train.summary_iterator(str(events)):
                newest = max(newest, event.step)
        except tf.errors.DataLossError:  # the last record of a killed writer may be cut short
            pass
    return newest


def checkpointed_step(model_dir):
    from capstf.checkpoints import list_checkpoints
    checkpoints = list_checkpoints(model_dir)
    return checkpoints[-1][0] if checkpoints else 0


def final_weights(model_dir):
    from capstf.checkpoints import restore_for_inference
    from capstf.config import load_saved
    model, step = restore_for_inference(model_dir, load_saved(model_dir))
    return step, [v.numpy() for v in model.trainable_variables]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--checkpoint-every", type=int, default=25)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--terms", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        straight, interrupted = Path(tmp, "straight"), Path(tmp, "interrupted")
        subprocess.run(command(straight, args), check=True, capture_output=True)
        plan = [signal.SIGKILL] * args.kills + [signal.SIGTERM] * args.terms
        rng.shuffle(plan)
        lost = {"SIGKILL": [], "SIGTERM": []}
        exit_codes = {"SIGKILL": [], "SIGTERM": []}
        for sig in plan:
            before = trained_step(interrupted) if interrupted.exists() else 0
            run = subprocess.Popen(command(interrupted, args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            # Wait until it trains a few steps past where it started, then a random moment more.
            while run.poll() is None and trained_step(interrupted) < before + 3:
                time.sleep(0.1)
            time.sleep(rng.uniform(0, 2))
            if run.poll() is not None:
                break  # finished before this interruption: the run is done
            run.send_signal(sig)
            run.wait()
            reached, saved = trained_step(interrupted), checkpointed_step(interrupted)
            lost[sig.name].append(max(0, reached - saved))
            exit_codes[sig.name].append(run.returncode)
        done = subprocess.run(command(interrupted, args), capture_output=True)
        (step_a, a), (step_b, b) = final_weights(straight), final_weights(interrupted)
        report = {
            "steps": args.steps, "checkpoint_every": args.checkpoint_every,
            "interruptions_survived": {name: len(v) for name, v in lost.items()},
            "steps_lost_per_interruption": lost,
            "max_steps_lost": {name: max(v, default=0) for name, v in lost.items()},
            "exit_codes": exit_codes, "final_run_exit_code": done.returncode,
            "final_step": [step_a, step_b],
            "same_final_weights": step_a == step_b and all(np.allclose(x, y, atol=1e-5) for x, y in zip(a, b)),
            "max_weight_difference": float(max(np.max(np.abs(x - y)) for x, y in zip(a, b))),
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
