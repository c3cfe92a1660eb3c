"""The model dir: its saved config, its checkpoints, and restoring a model for inference.

Used by train, evaluate, export, visualize and study alike, so none of them reaches into another.
"""
import fcntl
import os
import re
from pathlib import Path

import tensorflow as tf

from capstf import config as config_lib
from capstf.errors import CapstfError, RuntimeFailure, first_line, warn
from capstf.model import build_model


def checkpoint_dir(model_dir, task_id=None) -> Path:
    """Where checkpoints go: the chief's in `checkpoints/`; another worker's (task_id) in scratch."""
    if task_id is None:
        return Path(model_dir) / "checkpoints"
    return Path(model_dir) / "worker_scratch" / str(task_id)


def list_checkpoints(model_dir):
    """[(step, checkpoint path)] of every checkpoint kept in model_dir, oldest first."""
    state = tf.train.get_checkpoint_state(str(checkpoint_dir(model_dir)))
    paths = list(state.all_model_checkpoint_paths) if state else []
    return sorted((int(p.rsplit("-", 1)[1]), p) for p in paths if tf.io.gfile.exists(p + ".index"))


def training_progress(checkpoint):
    """(examples seen, seconds of training) recorded in a checkpoint; zeros if it predates them."""
    names = {name for name, _ in tf.train.list_variables(checkpoint)}
    read = lambda key: tf.train.load_variable(checkpoint, f"{key}/.ATTRIBUTES/VARIABLE_VALUE") \
        if f"{key}/.ATTRIBUTES/VARIABLE_VALUE" in names else 0
    return int(read("examples_seen")), float(read("train_seconds"))


def restore_newest_readable(checkpoint, paths, model_dir):
    """Restores the newest of `paths` (oldest first) that can be read; returns (its path, the
    restore status), or (None, None) if there are no paths. A damaged checkpoint (truncated or
    missing data file) is skipped, saying so."""
    for path in reversed(paths):
        try:
            status = checkpoint.restore(path)
        except (tf.errors.OpError, ValueError, IndexError) as e:  # what a truncated or missing file raises
            warn(f"checkpoint {path} is unreadable ({first_line(e)}); falling back to the one before it.")
            continue
        return path, status
    if paths:
        raise CapstfError(f"No checkpoint in {checkpoint_dir(model_dir)} can be read (all {len(paths)} damaged).")
    return None, None


def set_aside_damaged(model_dir, restored):
    """Moves the listed checkpoints newer than `restored` (those `restore_newest_readable`
    skipped as damaged) into checkpoints/damaged/ and drops them from the checkpoint list: the
    run that retrains past them then writes good ones in their place, where a damaged newest
    entry would have made it skip its final save. Returns the paths moved."""
    folder = checkpoint_dir(model_dir)
    state = tf.train.get_checkpoint_state(str(folder))
    # The manager's own record, oldest first, with the save times it needs to keep counting them.
    listed = list(state.all_model_checkpoint_paths) if state else []
    times = dict(zip(listed, state.all_model_checkpoint_timestamps)) if state else {}
    kept = listed[:listed.index(restored) + 1] if restored in listed else listed
    damaged = listed[len(kept):]
    if not damaged:
        return []
    aside = folder / "damaged"
    try:
        aside.mkdir(exist_ok=True)
        for path in damaged:
            for file in tf.io.gfile.glob(path + ".*"):
                os.replace(file, aside / Path(file).name)
        tf.compat.v1.train.update_checkpoint_state(  # names relative to the folder, as the manager writes them
            str(folder), Path(restored).name, [Path(p).name for p in kept],
            all_model_checkpoint_timestamps=[times[p] for p in kept] if len(times) == len(listed) else None,
            last_preserved_timestamp=state.last_preserved_timestamp)
    except (OSError, tf.errors.OpError) as e:
        raise RuntimeFailure(f"Cannot move the damaged checkpoint(s) {', '.join(damaged)} aside into {aside} "
                             f"({first_line(e)}); fix the folder, then rerun to resume.") from None
    warn(f"moved the damaged checkpoint(s) {', '.join(Path(p).name for p in damaged)} into {aside}; "
         "this run writes good ones in their place.")
    return damaged


def restore_for_inference(model_dir, cfg, checkpoint=None):
    """(model, step): the model of `checkpoint` (default: the newest readable one in model_dir),
    in float32 with plain-graph routing. A checkpoint without every weight of the model is
    refused: restoring it would leave random weights in place."""
    paths = [checkpoint] if checkpoint else [p for _, p in list_checkpoints(model_dir)]
    if not paths:
        raise CapstfError(f"{model_dir} has no checkpoint yet; train first.")
    model = build_model(cfg.model, jit_routing=False, precision="float32")
    path, status = restore_newest_readable(tf.train.Checkpoint(model=model), paths, model_dir)
    try:
        status.assert_existing_objects_matched()
    except AssertionError as e:
        missing = re.findall(r"path=([^>,\s]+)|Variable '([^']+)'", str(e))
        missing = [a or b for a, b in missing] or [str(e).splitlines()[0][:200]]
        raise CapstfError(f"{path} lacks weights this model needs ({', '.join(missing[:4])}"
                          f"{', ...' if len(missing) > 4 else ''}); it was not written by this model's training.") from None
    status.expect_partial()  # the optimizer's slots and training counters are not needed here
    return model, int(path.rsplit("-", 1)[1])


def prepare_model_dir(cfg, model_dir, chief: bool):
    """Creates the model dir, or checks that an existing one holds the same experiment; the
    chief then locks it and saves the config. Returns (the settings changed since, see
    config.check_compatible; the lock, an open file to close when training ends, or None)."""
    model_dir = Path(model_dir)
    changed = {}
    if (model_dir / "config.json").is_file():
        changed = config_lib.check_compatible(config_lib.load_saved(model_dir), cfg, model_dir,
                                              resuming=bool(list_checkpoints(model_dir)))
    elif model_dir.exists() and not model_dir.is_dir():
        raise CapstfError(f"--model-dir {model_dir} exists and is not a folder.")
    if not chief:
        return changed, None
    try:
        model_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RuntimeFailure(f"Cannot create --model-dir {model_dir}: {e.strerror}.") from None
    lock = lock_model_dir(model_dir)
    config_lib.save(cfg, model_dir)
    return changed, lock


def lock_model_dir(model_dir: Path):
    """An exclusive OS lock on model_dir/train.lock, held by the returned open file: a second
    trainer on the same model dir is refused, and a killed one leaves no stale lock behind
    (the OS drops the lock with the process)."""
    path = model_dir / "train.lock"
    try:
        handle = open(path, "w")
    except OSError as e:  # a read-only model dir, or one that is not ours
        raise RuntimeFailure(f"Cannot write {path} ({e.strerror or e}): training needs a model dir it can "
                             "write; fix its permissions or use another --model-dir.") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise CapstfError(f"{model_dir} is in use by another `capstf train` (it holds {path}); "
                          "wait for it to end or use another --model-dir.") from None
    except OSError as e:  # a file system without locks (some network mounts)
        handle.close()
        raise RuntimeFailure(f"Cannot lock {path} ({e.strerror or e}): the model dir's file system does not "
                             "support locks; use a --model-dir on one that does.") from None
    return handle
