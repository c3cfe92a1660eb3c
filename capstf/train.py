"""Training: strategy, the train step, checkpoints, TensorBoard and a progress bar.

Read `train` top to bottom: set up the device strategy and data, build the model and
optimizer under the strategy, resume from the newest checkpoint, then loop over steps.
"""
import math
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable, NamedTuple

import keras
import numpy as np
import tensorflow as tf
from tqdm import tqdm

from capstf import config as config_lib, cpu
from capstf.checkpoints import (checkpoint_dir, list_checkpoints, prepare_model_dir, restore_newest_readable,
                                set_aside_damaged)
from capstf.data.datasets import fit_model_to_data, make_dataset
from capstf.data.sources import load_examples, load_training_split
from capstf.data.service import check_reachable, generated_by_service
from capstf.errors import CapstfError, Preempted, RuntimeFailure
from capstf.evaluate import score
from capstf.metrics import exact_match
from capstf.model import build_model
from capstf.sheets import predict_batch, reconstruction_sheet


# ------------------------------------------------------------------------ device choices

def split_cpu(n: int):
    """Presents the CPU as n logical devices (MirroredStrategy tests). Call before any TF op."""
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * n)


def gpu_compute_capabilities():
    """[(major, minor)] of each visible GPU; empty on a machine without one."""
    return [tf.config.experimental.get_device_details(gpu).get("compute_capability", (0, 0))
            for gpu in tf.config.list_physical_devices("GPU")]


GPU_STEPS_PER_CALL = 16  # not yet measured on a GPU: benchmarks/train_step.py --steps-per-call


class DeviceChoices(NamedTuple):
    jit: str                      # routing | step | off
    precision: str                # float32 | mixed_bfloat16 | mixed_float16
    forward_conv_gradients: bool  # capstf's convolution gradients (True) or TensorFlow's
    steps_per_call: int           # training steps per compiled call


def device_defaults(train_cfg, gpus=None) -> DeviceChoices:
    """The training settings left to "auto" (0 for steps_per_call), chosen for this device.

    gpus: the GPUs' compute capabilities (default: the visible ones'; tests pass fakes).
    CPU, by instruction set (measured on each, benchmarks/train_step.py, docs/performance.md):
    XLA on the capsule layers but not the convolutions (XLA's CPU convolutions made the whole
    step much slower); bfloat16 convolutions where AVX512-BF16 exists, float32 elsewhere
    (bfloat16 without it is emulated, and slower); the convolution gradients as forward
    convolutions where AVX-512 exists (they suit oneDNN's AVX-512 kernels), TensorFlow's own on
    AVX2-only CPUs, where capstf's were slower. One step per call: a CPU step takes long
    enough that the host's dispatch does not show.
    GPU: TensorFlow's own convolution gradients, bfloat16 only where the GPU has it (compute
    capability 8.0 on), float16 with loss scaling on 7.x, float32 on older GPUs; mixed GPUs get
    the oldest's choice. GPU_STEPS_PER_CALL steps per call: a GPU step is short enough that
    launching it from Python costs a large share of it.
    """
    gpus = gpu_compute_capabilities() if gpus is None else gpus
    jit = "routing" if train_cfg.jit == "auto" else train_cfg.jit
    precision = train_cfg.precision
    if precision == "auto" and gpus:
        oldest = min(tuple(c) for c in gpus)
        precision = "mixed_bfloat16" if oldest >= (8, 0) else "mixed_float16" if oldest >= (7, 0) else "float32"
    elif precision == "auto":
        precision = "mixed_bfloat16" if cpu.has("avx512_bf16") else "float32"
    steps_per_call = train_cfg.steps_per_call or (GPU_STEPS_PER_CALL if gpus else 1)
    return DeviceChoices(jit, precision, not gpus and cpu.has("avx512f"), steps_per_call)


def make_strategy(kind: str) -> tf.distribute.Strategy:
    """The tf.distribute strategy; call it before any other TF work (collectives need that)."""
    if kind == "multi-worker" or (kind == "auto" and "TF_CONFIG" in os.environ):
        if "TF_CONFIG" not in os.environ:
            raise CapstfError("--distribute multi-worker needs TF_CONFIG describing the cluster "
                              "(see README, 'Many machines').")
        return tf.distribute.MultiWorkerMirroredStrategy()
    if kind != "mirrored" and not tf.config.list_physical_devices("GPU"):
        run_one_op_at_a_time()  # before listing logical devices, which starts TF
    gpus = tf.config.list_logical_devices("GPU")
    if kind == "mirrored" or (kind == "auto" and len(gpus) > 1):
        devices = [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]
        return tf.distribute.MirroredStrategy(devices)
    return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")


def run_one_op_at_a_time():
    """One CPU device: each convolution already uses every core, and two at once (a backward's
    input and kernel gradients) fight over them; one at a time made float32 steps 5% (best) to
    9% (median) faster in benchmarks/train_step.py. Not for several replicas, which must run
    side by side. Too late once TF has started (tests, notebooks): then TF's pools stay."""
    try:
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:
        pass


def check_workers_agree(strategy, step, examples_seen):
    """Every worker must resume from the chief's state: one that cannot see its checkpoints (no
    shared file system, another --model-dir) would start from step 0 with other weights, and
    training would diverge or hang in a collective. Gathers each worker's step and examples
    seen; where they differ, every worker refuses to start, naming the workers that differ."""
    cluster = strategy.cluster_resolver.cluster_spec().as_dict()
    workers = len(cluster.get("chief", [])) + len(cluster.get("worker", []))
    mine = tf.constant([[step, examples_seen]], tf.int64)
    every = strategy.gather(strategy.experimental_distribute_values_from_function(lambda ctx: mine), axis=0).numpy()
    # One row per replica, the replicas in task order (the chief first): one row per worker.
    states = [tuple(int(v) for v in row) for row in every[::strategy.num_replicas_in_sync // workers]]
    if len(set(states)) > 1:
        differ = [f"worker {i} is at step {s} ({e:,} examples seen)" for i, (s, e) in enumerate(states)
                  if (s, e) != states[0]]
        raise CapstfError(f"The workers did not restore the same state: the chief is at step {states[0][0]} "
                          f"({states[0][1]:,} examples seen), {', '.join(differ)}. Every worker must see the "
                          "chief's checkpoints: give all of them the same --model-dir on a shared file system.")


def is_chief(strategy) -> bool:
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    return resolver.task_type == "chief" or (resolver.task_type == "worker" and resolver.task_id == 0)


# ------------------------------------------------------------------ model, optimizer, state

class FusedAdam(keras.optimizers.Adam):
    """Keras' Adam (same update, same slot variables, so checkpoints interchange) with each
    variable's update done by one fused kernel: Keras' eight element-wise ops each pass over
    memory, a large share of a small-batch CPU step for CapsNet's 8.2M weights (timed in
    docs/performance.md). Without amsgrad, which capstf does not use."""

    def update_step(self, gradient, variable, learning_rate):
        index = self._get_variable_index(variable)
        step, beta_1, beta_2, epsilon, lr, grad = (tf.cast(x, variable.dtype) for x in (
            self.iterations + 1, self.beta_1, self.beta_2, self.epsilon, learning_rate, gradient))
        tf.raw_ops.ResourceApplyAdam(
            var=variable.handle, m=self._momentums[index].value.handle, v=self._velocities[index].value.handle,
            beta1_power=tf.pow(beta_1, step), beta2_power=tf.pow(beta_2, step), lr=lr,
            beta1=beta_1, beta2=beta_2, epsilon=epsilon, grad=grad)


def build_state(cfg, jit, precision, total_steps=1, forward_conv_gradients=True):
    """Model, optimizer and checkpoint (to be called under strategy.scope()).

    total_steps: the run's length, which the cosine schedule spans.
    forward_conv_gradients: see `device_defaults`.
    """
    keras.utils.set_random_seed(cfg.train.seed)
    model = build_model(cfg.model, jit_routing=(jit == "routing"), precision=precision,
                        forward_conv_gradients=forward_conv_gradients)
    if cfg.train.schedule == "cosine":
        schedule = keras.optimizers.schedules.CosineDecay(cfg.train.learning_rate, total_steps)
    else:
        schedule = keras.optimizers.schedules.ExponentialDecay(
            cfg.train.learning_rate, cfg.train.decay_steps, cfg.train.decay_rate)
    optimizer = FusedAdam(schedule)
    if precision == "mixed_float16":  # float16 gradients underflow without loss scaling
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    optimizer.build(model.trainable_variables)
    # steps_done counts the training steps (float16's loss scaling skips the update of a step
    # whose gradients overflow, so the optimizer's own count falls behind); examples_seen is the
    # data position to resume from (steps x batch size would be wrong after a change of
    # --batch-size); train_seconds adds up the training time over resumes.
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer,
                                     steps_done=tf.Variable(0, dtype=tf.int64, trainable=False),
                                     examples_seen=tf.Variable(0, dtype=tf.int64, trainable=False),
                                     train_seconds=tf.Variable(0.0, dtype=tf.float64, trainable=False))
    return model, optimizer, checkpoint


# ---------------------------------------------------------------------------- the loop

def train(cfg, model_dir, quiet=None) -> dict:
    """Trains (or resumes) the experiment `cfg` in model_dir; returns the final metrics.

    A SIGTERM or Ctrl-C during the setup (data loading, restore) ends the run at once; in the
    loop it stops the run, checkpointed, at the end of the compiled call in progress (one
    process) or of the next one, which carries the request to every worker (multi-worker). An
    evaluation it interrupts is cut short after its current batch.

    quiet: no progress bar; instead a line every log_every steps (step, epoch, loss, accuracy,
    examples/s, time left). Default: quiet without a terminal (logs of a batch job or a pod).
    """
    with StopSignals() as signals:
        return run_training(cfg, Path(model_dir), quiet, signals)


def run_training(cfg, model_dir: Path, quiet, signals) -> dict:
    """`train`, with the StopSignals that are active from its start."""
    quiet = (not sys.stderr.isatty()) if quiet is None else quiet
    strategy = make_strategy(cfg.train.distribute)
    signals.install()  # again: MultiWorkerMirroredStrategy puts TensorFlow's own SIGTERM handler in place
    jit, precision, forward_conv_gradients, steps_per_call = device_defaults(cfg.train)
    chief = is_chief(strategy)
    multi_worker = isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
    train_examples, validation_examples = load_training_split(
        cfg.data.data_dir, cfg.data.dataset, cfg.data.validation_digits)
    cfg = fit_model_to_data(cfg, train_examples)
    # Scored after each epoch: the held-out training examples if there are any, else the test ones.
    eval_split = "validation" if validation_examples is not None else "test"
    eval_data = None
    if cfg.train.eval_examples and chief:
        eval_data = validation_examples if validation_examples is not None else \
            load_examples(cfg.data.data_dir, "test", cfg.data.dataset)
    if cfg.train.data_service:
        check_reachable(cfg.train.data_service)
    changed, lock = prepare_model_dir(cfg, model_dir, chief)
    log = (lambda msg: None) if not chief else (lambda msg: tqdm.write(msg, file=sys.stdout))
    device_kind = "GPU" if tf.config.list_logical_devices("GPU") else "CPU"
    log(f"capstf: training {cfg.data.dataset} (recipe {cfg.recipe}) on {strategy.num_replicas_in_sync} "
        f"{device_kind} replica(s), {precision}, jit={jit}; model dir {model_dir} (full config: config.json)")
    global_batch = cfg.train.batch_size
    if global_batch % strategy.num_replicas_in_sync:
        raise CapstfError(f"--batch-size {global_batch} must divide evenly over "
                          f"{strategy.num_replicas_in_sync} replicas.")
    steps_per_epoch = max(1, len(train_examples.labels) // global_batch)
    total_steps = cfg.train.steps or math.ceil(cfg.train.epochs * steps_per_epoch)

    with strategy.scope():
        model, optimizer, checkpoint = build_state(cfg, jit, precision, total_steps, forward_conv_gradients)
    # Every worker resumes from the chief's newest readable checkpoint; workers other than the
    # chief write theirs to scratch (saving is collective), deleted when the run ends.
    restored, _ = restore_newest_readable(checkpoint, [path for _, path in list_checkpoints(model_dir)], model_dir)
    if chief and restored:
        set_aside_damaged(model_dir, restored)
    own_checkpoints = checkpoint_dir(model_dir, None if chief else strategy.cluster_resolver.task_id)
    manager = tf.train.CheckpointManager(checkpoint, str(own_checkpoints), cfg.train.keep_checkpoints)
    # Checkpoints written before capstf counted steps hold 0: their count is the optimizer's.
    start = int(checkpoint.steps_done.numpy()) or int(optimizer.iterations.numpy())
    # Checkpoints written before capstf counted examples hold 0: their position is steps x batch.
    start_example = int(checkpoint.examples_seen.numpy()) or start * global_batch
    if multi_worker:
        check_workers_agree(strategy, start, start_example)
    if start:
        log(f"resumed from step {start}" + (f"; already trained past --steps {total_steps}" if start >= total_steps else "")
            + (f"; settings changed since: {config_lib.describe_changes(changed)}" if changed else ""))

    def dataset_fn(ctx: tf.distribute.InputContext):
        examples = make_dataset(cfg.data, train_examples, "train", ctx.get_per_replica_batch_size(global_batch),
                                cfg.train.seed, start_example=start_example,
                                pipeline_id=ctx.input_pipeline_id, num_pipelines=ctx.num_input_pipelines)
        return generated_by_service(examples, cfg.train.data_service) if cfg.train.data_service else examples
    # Each replica's next two batches wait on its device, so no step waits for a host-to-device copy.
    batches = iter(strategy.distribute_datasets_from_function(dataset_fn, tf.distribute.InputOptions(
        experimental_fetch_to_device=True, experimental_per_replica_buffer_size=2)))
    train_call = make_train_call(model, optimizer, strategy, global_batch, jit == "step")
    preview = next(iter(make_dataset(cfg.data, train_examples, "test", 8, cfg.train.seed)))
    writer = tf.summary.create_file_writer(str(model_dir / "train")) if chief else tf.summary.create_noop_writer()
    clock, meter = TrainingClock(float(checkpoint.train_seconds.numpy())), Meter()
    # The step of the chief's newest good checkpoint, the same on every worker (they restored the
    # same one, and save together): whether to save at the end is decided from it, not from a
    # worker's own scratch checkpoints, which a finished run deletes.
    saved_step = start if restored else None
    result = {"step": start}
    bar = tqdm(total=total_steps, initial=start, unit="step", disable=quiet or not chief, dynamic_ncols=True)

    # ------------------------------------------------ what the loop does between calls
    def save(step):
        nonlocal saved_step
        saved_step = step
        checkpoint.steps_done.assign(step)
        checkpoint.examples_seen.assign(start_example + (step - start) * global_batch)
        checkpoint.train_seconds.assign(clock.total())
        last_good = manager.latest_checkpoint
        try:
            manager.save(checkpoint_number=step)
        except (tf.errors.OpError, OSError) as e:
            raise RuntimeFailure(f"Cannot write the step-{step} checkpoint to {own_checkpoints} "
                                 f"({getattr(e, 'message', None) or e}); the last good one, {last_good}, "
                                 "is intact: free space or fix the folder, then rerun to resume.") from None

    def save_unless_saved(step):
        if saved_step != step:
            save(step)

    def log_progress(step):
        nonlocal result
        means, rate = meter.means(), meter.examples_per_second()
        for k, v in {**means, "learning_rate": float(optimizer.learning_rate), "examples_per_second": rate}.items():
            tf.summary.scalar(k, v, step=step)
        bar.set_postfix(loss=f"{means['loss']:.4f}", acc=f"{means['accuracy']:.3f}", ex_s=f"{rate:.0f}")
        if quiet:  # no terminal (a batch job, Kubernetes' logs, > train.log): a line, not a bar
            left = round((total_steps - step) * global_batch / rate)
            log(f"step {step}/{total_steps} (epoch {step / steps_per_epoch:.2f}): loss {means['loss']:.4f}, "
                f"accuracy {means['accuracy']:.3f}, {rate:.0f} examples/s, "
                f"{left // 3600}:{left // 60 % 60:02d}:{left % 60:02d} left")
        result = {"step": step, **means, "examples_per_second": rate}
        meter.reset()

    def log_image(step):
        log_reconstructions(model, preview, step)

    def evaluate(step):
        eval_start, trained = time.perf_counter(), clock.in_this_run()
        ev = score(model, make_dataset(cfg.data, eval_data, "test", 100, cfg.train.seed, limit=cfg.train.eval_examples),
                   should_stop=lambda: signals.received is not None)
        if ev is None:  # a stop request: its grace period is not the evaluation's to spend
            log(f"step {step}: the {eval_split} evaluation was cut short by {signals.received}")
        else:
            tf.summary.scalar(f"{eval_split}_accuracy", ev["accuracy"], step=step)
            log(f"step {step} (epoch {step / steps_per_epoch:.2f}): {eval_split} accuracy "
                f"{ev['accuracy']:.4f} on {ev['examples']} examples; trained {trained:.0f} s in this run")
            result[f"{eval_split}_accuracy"] = ev["accuracy"]
        spent = time.perf_counter() - eval_start
        clock.pause(spent)
        meter.pause(spent)  # examples/s counts training only

    hooks = [Periodic(cfg.train.checkpoint_every, save),
             Periodic(cfg.train.log_every, log_progress, at_end=True),
             Periodic(cfg.train.checkpoint_every if chief else 0, log_image, at_end=True),
             Periodic(steps_per_epoch if eval_data is not None else 0, evaluate, at_end=True)]
    # A call of steps ends early at the next step a hook is due. The same on every worker (each
    # call is collective), though only the chief evaluates.
    boundaries = [cfg.train.checkpoint_every, cfg.train.log_every, steps_per_epoch if cfg.train.eval_examples else 0]

    def stop_asked_here():
        """One process stops at once; workers only after the call that tells them all."""
        return signals.received is not None and not multi_worker

    # ------------------------------------------------------------------- the loop
    stopped = False  # by a stop request on any worker
    done = start  # the last step finished
    signals.noting = True  # from here a stop request is checkpointed, not raised
    with writer.as_default():
        try:
            while done < total_steps:
                steps = call_length(done, steps_per_call, total_steps, boundaries)
                metrics = {k: float(v) for k, v in train_call(batches, steps, signals.received is not None).items()}
                done += steps
                stopped = metrics.pop("stop_requests") > 0
                meter.add(metrics, steps * global_batch)
                bar.update(steps)
                for hook in hooks:
                    if hook.due(done, total_steps):
                        hook.run(done)
                if stopped or stop_asked_here():
                    stopped = True
                    break
        except KeyboardInterrupt:  # a second Ctrl-C: keep every finished step where saving is ours alone
            if not multi_worker:
                save_unless_saved(done)
            raise
        save_unless_saved(done)
    bar.close()
    if lock:
        lock.close()
    if stopped and done < total_steps:  # at the last step: simply done
        if signals.received == "SIGINT":
            raise KeyboardInterrupt
        raise Preempted(f"stopped by {signals.received or 'a stop request to another worker'} after step "
                        f"{done} of {total_steps}, checkpointed in {own_checkpoints}; "
                        "rerun the same command to resume.")
    if not chief:  # workers save only because saving is collective; their copies are scratch
        shutil.rmtree(own_checkpoints, ignore_errors=True)
    return {**result, "examples_seen": int(checkpoint.examples_seen.numpy()),
            "train_seconds": round(float(checkpoint.train_seconds.numpy()), 1)}


class StopSignals:
    """While active, SIGTERM (what Kubernetes and batch schedulers send before a kill) and a first
    Ctrl-C stop training. Before `noting` is set (the setup: nothing of this run is trained yet,
    so nothing is lost) they raise at once: Preempted, or KeyboardInterrupt. After it they only
    note that a stop was asked for (`received`: the signal's name): the loop passes the request
    through the next call's all-reduce, so that every worker, whichever one was signalled, stops
    after the same step and writes its checkpoint with the others (saving is collective). A
    second Ctrl-C interrupts at once."""

    def __enter__(self):
        self.received, self.noting = None, False
        self.previous = {}
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread
            self.previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
            self.install()
        return self

    def install(self):
        """(Re)installs the handlers: TensorFlow's C++ runtime may have replaced them since (a
        replaced handler still shows as ours in signal.getsignal)."""
        for sig in self.previous:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if not self.noting:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise Preempted(f"stopped by {signal.Signals(signum).name} before training began; nothing of this "
                            "run was trained: rerun the same command to start (or resume) it.")
        self.received = self.received or signal.Signals(signum).name
        if signum == signal.SIGINT:  # the next Ctrl-C: Python's KeyboardInterrupt again
            signal.signal(signal.SIGINT, self.previous[signal.SIGINT])

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class Periodic(NamedTuple):
    """Work the loop does after a call, at every multiple of `every` steps (0: never) and, with
    at_end, after the last step."""
    every: int
    run: Callable[[int], None]
    at_end: bool = False

    def due(self, step: int, total_steps: int) -> bool:
        return bool(self.every) and (step % self.every == 0 or (self.at_end and step == total_steps))


class TrainingClock:
    """Seconds of training over every run of a model dir (what checkpoints keep): the time of
    earlier runs, plus this run's less what it spent evaluating."""

    def __init__(self, earlier_runs: float):
        self.earlier_runs, self.start, self.paused = earlier_runs, time.perf_counter(), 0.0

    def pause(self, seconds: float):
        self.paused += seconds

    def in_this_run(self) -> float:
        return time.perf_counter() - self.start - self.paused

    def total(self) -> float:
        return self.earlier_runs + self.in_this_run()


class Meter:
    """The metric sums and examples since the last log line, and their rate in training time."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.sums, self.examples, self.start = {}, 0, time.perf_counter()

    def add(self, metric_sums: dict, examples: int):
        for k, v in metric_sums.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.examples += examples

    def pause(self, seconds: float):
        self.start += seconds

    def means(self) -> dict:
        """Each metric's mean per example (the sums hold an "examples" count of their own)."""
        return {k: v / self.sums["examples"] for k, v in self.sums.items() if k != "examples"}

    def examples_per_second(self) -> float:
        return self.examples / (time.perf_counter() - self.start)


def make_train_call(model, optimizer, strategy, global_batch, jit_step):
    """A compiled call of training steps, one batch per replica each: call(iterator, steps,
    stop_requested) runs `steps` optimizer steps and returns their metric sums over the global
    batches, and in `stop_requests` how many replicas, over all workers and steps, were asked to
    stop (the all-reduce that carries the metrics carries it too). Several steps in one call
    spare the host a dispatch per step (Keras' steps_per_execution)."""
    @tf.function(jit_compile=jit_step)
    def replica_step(batch, stop_requested):
        # The loss is the mean over the global batch, so N replicas train like one device.
        example_weight = tf.constant(1.0 / global_batch)
        if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
            example_weight = optimizer.scale_loss(example_weight)
        out, losses, grads = model.losses_and_gradients(batch, example_weight)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        sums = {k: tf.reduce_sum(v) for k, v in losses.items()}
        sums["accuracy"] = tf.reduce_sum(tf.cast(exact_match(out["probabilities"], batch["label"]), tf.float32))
        sums["examples"] = tf.cast(tf.shape(batch["label"])[0], tf.float32)
        sums["stop_requests"] = tf.cast(stop_requested, tf.float32)
        return sums

    def one_step(iterator, stop_requested):
        per_replica = strategy.run(replica_step, args=(next(iterator), stop_requested))
        return {k: strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None) for k, v in per_replica.items()}

    @tf.function
    def call_fn(iterator, steps, stop_requested):
        def another_step(done, sums):
            step_sums = one_step(iterator, stop_requested)
            return done + 1, {k: sums[k] + step_sums[k] for k in sums}
        # The first step outside the loop fixes the sums' keys; the loop is explicit, not AutoGraph's.
        first = one_step(iterator, stop_requested)
        return tf.while_loop(lambda done, _: done < steps, another_step, (tf.constant(1), first))[1]

    def call(iterator, steps=1, stop_requested=False):
        # Tensors: one trace for every call length and both values of the flag.
        return call_fn(iterator, tf.constant(steps, tf.int32), tf.constant(stop_requested))
    return call


def call_length(step, steps_per_call, total_steps, every):
    """How many steps the call after `step` trains: steps_per_call, cut at total_steps and at
    the next multiple of each interval in `every` (0: none), where the loop has work to do."""
    end = min([step + steps_per_call, total_steps] + [(step // e + 1) * e for e in every if e])
    return end - step


def log_reconstructions(model, batch, step):
    """TensorBoard image: `capstf visualize reconstructions`' sheet for a fixed batch."""
    out, labels, predictions = predict_batch(model, model.cfg.digits_per_image, batch)
    if "reconstructions" in out:
        sheet = reconstruction_sheet(batch["image"].numpy(), out["reconstructions"].numpy(), labels, predictions)
        tf.summary.image("reconstructions", np.asarray(sheet)[None], step=step)
