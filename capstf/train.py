"""Training: strategy, the train step, checkpoints, TensorBoard and a progress bar.

Read `train` top to bottom: set up the device strategy and data, build the model and
optimizer under the strategy, resume from the newest checkpoint, then loop over steps.
"""
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import tensorflow as tf
from tensorflow import keras
from tqdm import tqdm

from capstf import config as config_lib
from capstf.data.datasets import make_dataset
from capstf.data.sources import load_digits
from capstf.errors import CapstfError
from capstf.evaluate import exact_match, score
from capstf.model import build_model


# ------------------------------------------------------------------------ device choices

def split_cpu(n: int):
    """Presents the CPU as n logical devices (MirroredStrategy tests). Call before any TF op."""
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * n)


def cpu_has_bf16() -> bool:
    try:
        return " avx512_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def device_defaults(train_cfg):
    """(jit, precision), replacing "auto" by the fastest correct choice measured per device.

    CPU (benchmarks/train_step.py): XLA on the capsule layers but not the convolutions (XLA's
    CPU convolutions made the whole step ~12x slower), and bfloat16 convolutions where
    AVX512-BF16 exists. GPU: not measured here; the same choices are the safe ones.
    """
    jit = "routing" if train_cfg.jit == "auto" else train_cfg.jit
    precision = train_cfg.precision
    if precision == "auto":
        gpu = bool(tf.config.list_physical_devices("GPU"))
        precision = "mixed_bfloat16" if (gpu or cpu_has_bf16()) else "float32"
    return jit, precision


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


def is_chief(strategy) -> bool:
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    return resolver.task_type == "chief" or (resolver.task_type == "worker" and resolver.task_id == 0)


# ------------------------------------------------------------------ model, optimizer, state

class FusedAdam(keras.optimizers.Adam):
    """Keras' Adam (same update, same slot variables, so checkpoints interchange) with each
    variable's update done by one fused kernel: Keras' eight element-wise ops each pass over
    memory, 24 ms of a 180 ms batch-32 CPU step for CapsNet's 8.2M weights; fused, 7 ms.
    Without amsgrad, which capstf does not use."""

    def update_step(self, gradient, variable, learning_rate):
        index = self._get_variable_index(variable)
        step, beta_1, beta_2, epsilon, lr, grad = (tf.cast(x, variable.dtype) for x in (
            self.iterations + 1, self.beta_1, self.beta_2, self.epsilon, learning_rate, gradient))
        tf.raw_ops.ResourceApplyAdam(
            var=variable.handle, m=self._momentums[index].value.handle, v=self._velocities[index].value.handle,
            beta1_power=tf.pow(beta_1, step), beta2_power=tf.pow(beta_2, step), lr=lr,
            beta1=beta_1, beta2=beta_2, epsilon=epsilon, grad=grad)


def build_state(cfg, jit, precision, total_steps=1):
    """Model, optimizer and checkpoint (to be called under strategy.scope()).

    total_steps: the run's length, which the cosine schedule spans.
    """
    keras.utils.set_random_seed(cfg.train.seed)
    model = build_model(cfg.model, jit_routing=(jit == "routing"), precision=precision)
    if cfg.train.schedule == "cosine":
        schedule = keras.optimizers.schedules.CosineDecay(cfg.train.learning_rate, total_steps)
    else:
        schedule = keras.optimizers.schedules.ExponentialDecay(
            cfg.train.learning_rate, cfg.train.decay_steps, cfg.train.decay_rate)
    optimizer = FusedAdam(schedule)
    if precision == "mixed_float16":  # float16 gradients underflow without loss scaling
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    optimizer.build(model.trainable_variables)
    return model, optimizer, tf.train.Checkpoint(model=model, optimizer=optimizer)


def restore_for_inference(model_dir, cfg):
    """The model of the newest checkpoint in model_dir, in float32 with plain-graph routing."""
    latest = tf.train.latest_checkpoint(str(Path(model_dir) / "checkpoints"))
    if latest is None:
        raise CapstfError(f"{model_dir} has no checkpoint yet; train first.")
    model = build_model(cfg.model, jit_routing=False, precision="float32")
    tf.train.Checkpoint(model=model).restore(latest).expect_partial()
    return model, int(latest.rsplit("-", 1)[1])


# ---------------------------------------------------------------------------- the loop

def train(cfg, model_dir, quiet=None) -> dict:
    """Trains (or resumes) the experiment `cfg` in model_dir; returns the final metrics."""
    model_dir = Path(model_dir)
    quiet = (not sys.stderr.isatty()) if quiet is None else quiet
    strategy = make_strategy(cfg.train.distribute)
    jit, precision = device_defaults(cfg.train)
    chief = is_chief(strategy)
    train_digits = load_digits(cfg.data.data_dir, "train")
    test_digits = load_digits(cfg.data.data_dir, "test") if cfg.train.eval_examples else None
    changed = prepare_model_dir(cfg, model_dir, chief)
    log = (lambda msg: None) if not chief else (lambda msg: tqdm.write(msg, file=sys.stdout))
    log(f"capstf: {cfg.recipe} on {strategy.num_replicas_in_sync} replica(s), jit={jit}, "
        f"precision={precision}, model dir {model_dir}")
    global_batch = cfg.train.batch_size
    if global_batch % strategy.num_replicas_in_sync:
        raise CapstfError(f"--batch-size {global_batch} must divide evenly over "
                          f"{strategy.num_replicas_in_sync} replicas.")
    steps_per_epoch = max(1, len(train_digits.labels) // global_batch)
    total_steps = cfg.train.steps or math.ceil(cfg.train.epochs * steps_per_epoch)

    with strategy.scope():
        model, optimizer, checkpoint = build_state(cfg, jit, precision, total_steps)
    manager = tf.train.CheckpointManager(
        checkpoint, str(checkpoint_dir(model_dir, strategy, chief)), cfg.train.keep_checkpoints)
    manager.restore_or_initialize()
    start = int(optimizer.iterations.numpy())
    if start:
        log(f"resumed from step {start}" + (f"; already trained past --steps {total_steps}" if start >= total_steps else "")
            + (f"; settings changed since: {config_lib.describe_changes(changed)}" if changed else ""))

    def dataset_fn(ctx: tf.distribute.InputContext):
        return make_dataset(cfg.data, train_digits, "train", ctx.get_per_replica_batch_size(global_batch),
                            cfg.train.seed, start_example=start * global_batch,
                            pipeline_id=ctx.input_pipeline_id, num_pipelines=ctx.num_input_pipelines)
    batches = iter(strategy.distribute_datasets_from_function(dataset_fn))
    train_step = make_train_step(model, optimizer, strategy, global_batch, jit == "step")

    preview = next(iter(make_dataset(cfg.data, train_digits, "test", 8, cfg.train.seed)))
    writer = tf.summary.create_file_writer(str(model_dir / "train")) if chief else tf.summary.create_noop_writer()
    sums, t0, seen = {}, time.perf_counter(), 0
    run_start, eval_seconds = t0, 0.0
    bar = tqdm(total=total_steps, initial=start, unit="step", disable=quiet or not chief, dynamic_ncols=True)
    result = {"step": start}
    with writer.as_default():
        try:
            for step in range(start + 1, total_steps + 1):
                metrics = {k: float(v) for k, v in train_step(batches).items()}
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + v
                seen += global_batch
                if step % cfg.train.checkpoint_every == 0:
                    manager.save(checkpoint_number=step)
                if step % cfg.train.log_every == 0 or step == total_steps:
                    rate = seen / (time.perf_counter() - t0)
                    means = {k: v / sums["examples"] for k, v in sums.items() if k != "examples"}
                    lr = float(optimizer.learning_rate)
                    for k, v in {**means, "learning_rate": lr, "examples_per_second": rate}.items():
                        tf.summary.scalar(k, v, step=step)
                    bar.set_postfix(loss=f"{means['loss']:.4f}", acc=f"{means['accuracy']:.3f}", ex_s=f"{rate:.0f}")
                    result = {"step": step, **means, "examples_per_second": rate}
                    sums, t0, seen = {}, time.perf_counter(), 0
                if chief and (step % cfg.train.checkpoint_every == 0 or step == total_steps):
                    log_reconstructions(model, preview, step)
                bar.update(1)
                if test_digits is not None and (step % steps_per_epoch == 0 or step == total_steps):
                    eval_start = time.perf_counter()
                    ev = score(model, make_dataset(cfg.data, test_digits, "test", 100, cfg.train.seed,
                                                   limit=cfg.train.eval_examples))
                    tf.summary.scalar("test_accuracy", ev["accuracy"], step=step)
                    log(f"step {step} (epoch {step / steps_per_epoch:.2f}): test accuracy "
                        f"{ev['accuracy']:.4f} on {ev['examples']} examples; trained "
                        f"{eval_start - run_start - eval_seconds:.0f} s in this run")
                    spent = time.perf_counter() - eval_start
                    eval_seconds += spent
                    t0 += spent  # examples/s counts training only
                    result["test_accuracy"] = ev["accuracy"]
        except KeyboardInterrupt:  # keep every finished step, then stop
            save_latest(manager, optimizer)
            raise
        save_latest(manager, optimizer)
    bar.close()
    if not chief:  # workers save only because saving is collective; their copies are scratch
        shutil.rmtree(checkpoint_dir(model_dir, strategy, chief), ignore_errors=True)
    return result


def save_latest(manager, optimizer):
    """Checkpoints the current step unless the newest checkpoint already holds it."""
    step = int(optimizer.iterations.numpy())
    if manager.latest_checkpoint is None or not manager.latest_checkpoint.endswith(f"-{step}"):
        manager.save(checkpoint_number=step)


def make_train_step(model, optimizer, strategy, global_batch, jit_step):
    """One optimizer step on one batch per replica; returns metric sums over the global batch."""
    @tf.function(jit_compile=jit_step)
    def replica_step(batch):
        with tf.GradientTape() as tape:
            out = model(batch["image"], labels=batch["label"], training=True)
            losses = model.per_example_losses(out, batch)
            # Averaged over the global batch, so N replicas train like one device.
            loss = tf.nn.compute_average_loss(losses["loss"], global_batch_size=global_batch)
            if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
                loss = optimizer.scale_loss(loss)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        sums = {k: tf.reduce_sum(v) for k, v in losses.items()}
        sums["accuracy"] = tf.reduce_sum(tf.cast(exact_match(out["probabilities"], batch["label"]), tf.float32))
        sums["examples"] = tf.cast(tf.shape(batch["label"])[0], tf.float32)
        return sums

    @tf.function
    def step(iterator):
        per_replica = strategy.run(replica_step, args=(next(iterator),))
        return {k: strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None) for k, v in per_replica.items()}
    return step


def log_reconstructions(model, batch, step):
    """TensorBoard image: `capstf visualize reconstructions`' sheet for a fixed batch."""
    from capstf.visualize import predict_batch, reconstruction_sheet
    out, labels, predictions = predict_batch(model, model.cfg.digits_per_image, batch)
    if "reconstructions" in out:
        sheet = reconstruction_sheet(batch["image"].numpy(), out["reconstructions"].numpy(), labels, predictions)
        tf.summary.image("reconstructions", np.asarray(sheet)[None], step=step)


# --------------------------------------------------------------------------- model dir

def checkpoint_dir(model_dir: Path, strategy, chief: bool) -> Path:
    if chief:
        return model_dir / "checkpoints"
    return model_dir / "worker_scratch" / str(strategy.cluster_resolver.task_id)


def prepare_model_dir(cfg, model_dir: Path, chief: bool):
    """Creates the model dir, or checks that an existing one holds the same experiment; returns
    the settings changed since (see config.check_compatible)."""
    changed = {}
    saved_path = model_dir / "config.json"
    if saved_path.is_file():
        changed = config_lib.check_compatible(config_lib.load_saved(model_dir), cfg, model_dir)
    elif model_dir.exists() and not model_dir.is_dir():
        raise CapstfError(f"--model-dir {model_dir} exists and is not a folder.")
    if chief:
        try:
            model_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CapstfError(f"Cannot create --model-dir {model_dir}: {e.strerror}.") from None
        config_lib.save(cfg, model_dir)
    return changed
