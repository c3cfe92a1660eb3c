"""Kills a real `capstf train` run again and again and checks that nothing is lost. Prints JSON.

    python benchmarks/faults.py [--mode one-process|float16|multi-worker] [--steps 1500]
                                [--checkpoint-every 25] [--kills 10] [--terms 5] [--seed 0]

A small CapsNet trains on the bundled digits. It is interrupted with SIGKILL at `--kills` random
moments and with SIGTERM at `--terms` more, each time resumed by the same command, until it
finishes. Reported: the interruptions survived, the steps lost per interruption (the steps
trained since the last checkpoint; at most one checkpoint interval for SIGKILL, none for
SIGTERM), and whether the final weights equal those of the same run left alone.

Modes: one-process (float32); float16 (mixed_float16 from Keras' initial loss scale, 2^15; the
JSON's `counters` give the steps counted and the updates the optimizer applied, fewer where a
step's gradients overflowed and its update was skipped: such steps must still count); multi-worker (two
MultiWorkerMirroredStrategy workers on 127.0.0.1; a SIGKILL hits one random worker or both, a
SIGTERM one random worker, which must stop both at the same step; the survivor of a SIGKILL is
given `--survivor-grace` seconds to exit on its own, then killed, and the time it took is reported).
"""
import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def command(model_dir, args):
    precision = "mixed_float16" if args.mode == "float16" else "float32"
    return [sys.executable, "-m", "capstf.cli", "train", "--dataset", "mnist", "--data-dir", "sample",
            "--model-dir", str(model_dir), "--steps", str(args.steps), "--batch-size", "16",
            "--checkpoint-every", str(args.checkpoint_every), "--precision", precision, "--seed", str(args.seed),
            "--set", "model.conv1_filters=16", "--set", "model.primary_caps_types=4", "--set", "train.log_every=1",
            *(["--distribute", "multi-worker"] if args.mode == "multi-worker" else [])]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(model_dir, args, output=subprocess.DEVNULL):
    """The run's processes: one, or the two workers of a fresh cluster on 127.0.0.1."""
    if args.mode != "multi-worker":
        return [subprocess.Popen(command(model_dir, args), stdout=output, stderr=output)]
    cluster = {"worker": [f"127.0.0.1:{free_port()}" for _ in range(2)]}
    return [subprocess.Popen(command(model_dir, args), stdout=output, stderr=output, env={
        **os.environ, "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})})
        for i in range(2)]


def run_to_the_end(model_dir, args):
    """Exit codes of the run's processes, trained (or resumed) to its last step."""
    processes = start(model_dir, args)
    return [p.wait() for p in processes]


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


def step_counters(model_dir):
    """The newest checkpoint's step count and every optimizer update count in it (with float16,
    the updates fall behind the steps by the steps whose gradients overflowed)."""
    import tensorflow as tf
    from capstf.checkpoints import list_checkpoints
    reader = tf.train.load_checkpoint(list_checkpoints(model_dir)[-1][1])
    names = reader.get_variable_to_shape_map()
    return {"steps_done": int(reader.get_tensor("steps_done/.ATTRIBUTES/VARIABLE_VALUE")),
            "optimizer_updates": {name.split("/.ATTRIBUTES")[0]: int(reader.get_tensor(name))
                                  for name in names if name.endswith("iterations/.ATTRIBUTES/VARIABLE_VALUE")}}


def final_weights(model_dir):
    from capstf.checkpoints import restore_for_inference
    from capstf.config import load_saved
    model, step = restore_for_inference(model_dir, load_saved(model_dir))
    return step, [v.numpy() for v in model.trainable_variables]


def interrupt(processes, sig, rng, args):
    """Sends sig to one random worker (SIGTERM; SIGKILL half the time) or to every process;
    waits for all to exit. Returns (exit codes, the signal's targets, seconds the others took to exit)."""
    targets = list(range(len(processes)))
    if len(processes) > 1 and (sig == signal.SIGTERM or rng.random() < 0.5):
        targets = [rng.randrange(len(processes))]
    for i in targets:
        processes[i].send_signal(sig)
    started, others_took = time.time(), None
    for i, p in enumerate(processes):
        if i in targets:
            p.wait()
            continue
        try:
            p.wait(timeout=args.survivor_grace)
        except subprocess.TimeoutExpired:  # a survivor stuck in a collective: what an orchestrator would do
            p.kill()
            p.wait()
        others_took = round(time.time() - started, 1)
    return [p.returncode for p in processes], targets, others_took


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=("one-process", "float16", "multi-worker"), default="one-process")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--checkpoint-every", type=int, default=25)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--terms", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--survivor-grace", type=float, default=60.0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        straight, interrupted = Path(tmp, "straight"), Path(tmp, "interrupted")
        straight_codes = run_to_the_end(straight, args)
        plan = [signal.SIGKILL] * args.kills + [signal.SIGTERM] * args.terms
        rng.shuffle(plan)
        events = []
        for sig in plan:
            before = trained_step(interrupted) if interrupted.exists() else 0
            processes = start(interrupted, args)
            # Wait until it trains a few steps past where it started, then a random moment more.
            while all(p.poll() is None for p in processes) and trained_step(interrupted) < before + 3:
                time.sleep(0.1)
            time.sleep(rng.uniform(0, 2))
            if any(p.poll() is not None for p in processes):
                [p.wait() for p in processes]
                break  # finished before this interruption: the run is done
            codes, targets, others_took = interrupt(processes, sig, rng, args)
            reached, saved = trained_step(interrupted), checkpointed_step(interrupted)
            events.append({"signal": sig.name, "workers_signalled": targets, "exit_codes": codes,
                           "steps_lost": max(0, reached - saved), "others_exited_after_s": others_took})
        final_codes = run_to_the_end(interrupted, args)
        (step_a, a), (step_b, b) = final_weights(straight), final_weights(interrupted)
        by_signal = {name: [e for e in events if e["signal"] == name] for name in ("SIGKILL", "SIGTERM")}
        report = {
            "mode": args.mode, "steps": args.steps, "checkpoint_every": args.checkpoint_every, "seed": args.seed,
            "interruptions_survived": {name: len(v) for name, v in by_signal.items()},
            "max_steps_lost": {name: max((e["steps_lost"] for e in v), default=0) for name, v in by_signal.items()},
            "interruptions": events,
            "straight_run_exit_codes": straight_codes, "final_run_exit_codes": final_codes,
            "final_step": [step_a, step_b],
            "counters": {"straight": step_counters(straight), "interrupted": step_counters(interrupted)},
            "same_final_weights": step_a == step_b and all(np.allclose(x, y, atol=1e-5) for x, y in zip(a, b)),
            "max_weight_difference": float(max(np.max(np.abs(x - y)) for x, y in zip(a, b))),
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
