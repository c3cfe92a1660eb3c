"""Training, evaluation and export under faults: damaged checkpoints, SIGTERM, a second
trainer, a full disk, checkpoints that do not hold the model."""
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from conftest import differences_in_exported_files, model_from_checkpoint_files, small_config

from capstf.checkpoints import list_checkpoints, restore_for_inference
from capstf.errors import CapstfError, RuntimeFailure
from capstf.evaluate import evaluate
from capstf.export import export
from capstf.train import train


def weights(model_dir, cfg):
    model, step = restore_for_inference(model_dir, cfg)
    return step, [v.numpy() for v in model.trainable_variables]


@pytest.fixture
def two_checkpoints(tmp_path):
    cfg = small_config(steps=4, checkpoint_every=2)
    train(cfg, tmp_path, quiet=True)
    return tmp_path, cfg


def damage(checkpoint_path, how):
    data = next(p for p in os.listdir(os.path.dirname(checkpoint_path))
                if p.startswith(os.path.basename(checkpoint_path) + ".data"))
    path = os.path.join(os.path.dirname(checkpoint_path), data)
    if how == "truncate":
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 3)
    else:
        os.remove(path)


@pytest.mark.parametrize("how", ["truncate", "delete"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(two_checkpoints, how, capsys):
    model_dir, cfg = two_checkpoints
    (_, older), (_, newest) = list_checkpoints(model_dir)[-2:]
    reader = tf.train.load_checkpoint(older)
    expected = reader.get_tensor("model/digit/w/.ATTRIBUTES/VARIABLE_VALUE")
    damage(newest, how)
    model, step = restore_for_inference(model_dir, cfg)
    assert step == 2 and np.array_equal(model.digit.w.numpy(), expected)
    assert f"checkpoint {newest} is unreadable" in capsys.readouterr().err
    resumed = train(small_config(steps=6, checkpoint_every=2), model_dir, quiet=True)  # training falls back too
    assert resumed["step"] == 6 and resumed["examples_seen"] == 6 * 32


def test_a_rerun_past_a_damaged_final_checkpoint_writes_a_good_one_in_its_place(tmp_path, capsys):
    cfg = small_config(steps=5, checkpoint_every=2)  # checkpoints at steps 2, 4 and the final 5
    train(cfg, tmp_path, quiet=True)
    step, finished = weights(tmp_path, cfg)
    final = list_checkpoints(tmp_path)[-1][1]
    damage(final, "truncate")
    assert train(cfg, tmp_path, quiet=True)["step"] == 5  # the same command: retrains step 5
    assert "moved the damaged checkpoint(s) ckpt-5 into" in capsys.readouterr().err
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 4, 5]
    assert (tmp_path / "checkpoints" / "damaged").is_dir()
    tf.train.load_checkpoint(final)  # readable again
    resumed_step, resumed = weights(tmp_path, cfg)  # and no warning now: nothing damaged is listed
    assert resumed_step == 5 and "unreadable" not in capsys.readouterr().err
    for a, b in zip(finished, resumed):  # the same examples, in the same order: the same weights
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def test_no_readable_checkpoint_is_a_clear_error(two_checkpoints):
    model_dir, cfg = two_checkpoints
    for _, path in list_checkpoints(model_dir):
        damage(path, "truncate")
    with pytest.raises(CapstfError, match="No checkpoint in .* can be read"):
        restore_for_inference(model_dir, cfg)


def test_a_checkpoint_without_the_models_weights_is_refused(tmp_path):
    cfg = small_config(steps=1, settings={"model.decoder": False})
    train(cfg, tmp_path, quiet=True)
    cfg = cfg.with_settings({"model.decoder": True})  # as if config.json named a model the checkpoint does not hold
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    with pytest.raises(CapstfError, match="lacks weights this model needs .*decoder"):
        restore_for_inference(tmp_path, cfg)
    with pytest.raises(CapstfError, match="lacks weights"):
        export(tmp_path, tmp_path / "out", formats=("savedmodel",), data_dir="sample")


def test_a_second_trainer_on_a_model_dir_in_use_is_refused_but_a_killed_ones_lock_is_not(tmp_path):
    train(small_config(steps=1), tmp_path, quiet=True)
    hold = "import fcntl, sys, time; f = open(sys.argv[1], 'w'); fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(600)"
    holder = subprocess.Popen([sys.executable, "-c", hold, str(tmp_path / "train.lock")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(CapstfError, match="in use by another `capstf train`"):
        train(small_config(steps=2), tmp_path, quiet=True)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert train(small_config(steps=2), tmp_path, quiet=True)["step"] == 2  # the OS dropped the lock


def test_two_real_trainers_on_one_model_dir_the_second_refused_in_one_line(tmp_path):
    command = [sys.executable, "-m", "capstf.cli", "train", "--dataset", "mnist", "--data-dir", "sample", "--runlocal",
               "--model-dir", str(tmp_path / "run"), "--steps", "100000", "--set", "model.conv1_filters=16",
               "--set", "model.primary_caps_types=4"]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert first.stdout.readline().startswith("capstf: training mnist")  # it holds the lock by now
        second = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2 and "Traceback" not in second.stderr
        assert second.stderr.strip().splitlines()[-1].startswith(f"capstf: error: {tmp_path / 'run'} is in use by")
        assert first.poll() is None  # the first trains on
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=120)


@pytest.mark.parametrize("failure, message", [
    ("open", "Cannot write .*train.lock \\(Read-only file system\\): training needs a model dir it can write"),
    ("flock", "Cannot lock .*train.lock \\(No locks available\\): the model dir's file system does not support locks")])
def test_a_model_dir_that_cannot_be_locked_is_one_line(tmp_path, monkeypatch, failure, message):
    import builtins

    from capstf import checkpoints
    if failure == "open":
        real_open = builtins.open
        monkeypatch.setattr(builtins, "open", lambda path, *a, **k: (_ for _ in ()).throw(
            OSError(errno.EROFS, "Read-only file system")) if str(path).endswith("train.lock") else real_open(path, *a, **k))
    else:
        monkeypatch.setattr(checkpoints.fcntl, "flock", lambda *a: (_ for _ in ()).throw(
            OSError(errno.ENOLCK, "No locks available")))
    with pytest.raises(RuntimeFailure, match=message):
        train(small_config(steps=1), tmp_path, quiet=True)


def test_a_worker_never_reads_a_half_written_config_while_the_chief_rewrites_it(tmp_path):
    # At every (re)start the chief rewrites config.json while the other workers read it; a
    # worker that saw it empty failed with a JSONDecodeError traceback (seen in a resumed run).
    from capstf import config as config_lib
    cfg = small_config(steps=1)
    config_lib.save(cfg, tmp_path)
    # The reader reads until told to stop; the chief rewrites 300 times meanwhile, however fast
    # either goes on a busy machine.
    stop = tmp_path.parent / f"{tmp_path.name}.stop"
    read = ("import json, os, sys\nbad = reads = 0\nprint('reading', flush=True)\nwhile True:\n"
            "    try: json.loads(open(sys.argv[1]).read())\n    except ValueError: bad += 1\n"
            "    reads += 1\n    if os.path.exists(sys.argv[2]): break\nprint(bad, reads)")
    reader = subprocess.Popen([sys.executable, "-c", read, str(tmp_path / "config.json"), str(stop)],
                              stdout=subprocess.PIPE, text=True)
    assert reader.stdout.readline().strip() == "reading"
    for _ in range(300):
        config_lib.save(cfg, tmp_path)
    stop.touch()
    bad, reads = map(int, reader.communicate(timeout=60)[0].split())
    assert bad == 0 and reads >= 1
    assert config_lib.load_saved(tmp_path) == cfg and [p.name for p in tmp_path.iterdir()] == ["config.json"]


@pytest.mark.parametrize("content", ["", '{"data": {"dataset": "mni', '["mnist"]', "\xff\xfe"])
def test_a_damaged_config_json_is_one_line_naming_it_not_a_traceback(tmp_path, content):
    from click.testing import CliRunner
    from capstf.cli import main
    (tmp_path / "config.json").write_bytes(content.encode("latin-1"))
    result = CliRunner().invoke(main, ["evaluate", "--model-dir", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert result.output.startswith(f"capstf: error: {tmp_path / 'config.json'} is damaged (")
    assert len(result.output.strip().splitlines()) == 1


def test_a_json_record_cut_short_by_a_full_disk_leaves_the_old_record_and_no_scratch_file(tmp_path, monkeypatch):
    from capstf.files import read_json, write_json
    record = tmp_path / "record.json"
    write_json(record, {"step": 1})
    real_write_text = Path.write_text

    def write_half_then_fail(self, text, *args, **kwargs):
        real_write_text(self, text[:len(text) // 2], *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(Path, "write_text", write_half_then_fail)
    with pytest.raises(RuntimeFailure, match=r"Cannot write .*record\.json \(No space left on device\)"):
        write_json(record, {"step": 2})
    monkeypatch.undo()
    assert read_json(record) == {"step": 1} and [p.name for p in tmp_path.iterdir()] == ["record.json"]


def test_a_written_record_is_on_the_disk_before_it_replaces_the_old_one(tmp_path, monkeypatch):
    from capstf import files
    events = []
    monkeypatch.setattr(files.os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))))
    real_replace = files.os.replace
    monkeypatch.setattr(files.os, "replace", lambda a, b: events.append(("rename", str(b))) or real_replace(a, b))
    files.write_json(tmp_path / "config.json", {"step": 1})
    scratch, renamed, folder = events
    assert scratch[0] == "fsync" and Path(scratch[1]).name == f".config.json.{os.getpid()}.tmp"
    assert renamed == ("rename", str(tmp_path / "config.json")) and folder == ("fsync", str(tmp_path.resolve()))


def test_scratch_files_of_killed_writers_are_removed_and_a_living_writers_kept(tmp_path):
    from capstf.files import write_json
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    killed = tmp_path / f".config.json.{int(dead.stdout)}.tmp"  # what a SIGKILL mid-write leaves
    living = tmp_path / f".config.json.{os.getppid()}.tmp"     # another writer, still at work
    killed.write_text('{"ste')
    living.write_text('{"ste')
    write_json(tmp_path / "config.json", {"step": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["config.json", living.name])


def test_evaluating_a_model_dir_that_cannot_be_written_still_gives_the_metrics(trained_mnist, monkeypatch, capsys):
    model_dir, _ = trained_mnist  # say, a downloaded model on a read-only mount

    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(Path, "write_text", read_only)
    assert evaluate(model_dir, limit=100)["examples"] == 100
    assert "capstf: warning: the metrics are not saved: Cannot write" in capsys.readouterr().err


def test_a_full_disk_mid_run_is_a_clear_error_and_the_last_checkpoint_stays_good(tmp_path, monkeypatch):
    saves = []
    real_save = tf.train.CheckpointManager.save

    def save(self, *args, **kwargs):
        saves.append(1)
        if len(saves) == 2:  # the disk fills halfway through the step-4 data file
            folder = tmp_path / "run" / "checkpoints"
            written = (folder / "ckpt-2.data-00000-of-00001").read_bytes()
            (folder / "ckpt-4.data-00000-of-00001").write_bytes(written[:len(written) // 2])
            raise tf.errors.ResourceExhaustedError(None, None, "No space left on device")
        return real_save(self, *args, **kwargs)
    monkeypatch.setattr(tf.train.CheckpointManager, "save", save)
    cfg = small_config(steps=6, checkpoint_every=2)
    with pytest.raises(RuntimeFailure, match="Cannot write the step-4 checkpoint .*No space left.*ckpt-2, is intact"):
        train(cfg, tmp_path / "run", quiet=True)
    monkeypatch.undo()
    step, _ = weights(tmp_path / "run", cfg)
    assert step == 2
    # Space freed, the same command: it goes on from step 2, past the half-written file.
    assert train(cfg, tmp_path / "run", quiet=True)["step"] == 6
    train(cfg, tmp_path / "straight", quiet=True)
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [2, 4, 6]
    tf.train.load_checkpoint(list_checkpoints(tmp_path / "run")[1][1])  # step 4 written whole this time
    (step_a, a), (step_b, b) = weights(tmp_path / "straight", cfg), weights(tmp_path / "run", cfg)
    assert step_a == step_b == 6
    for x, y in zip(a, b):
        np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-6)


def capstf_train(model_dir, steps, **popen):
    args = [sys.executable, "-m", "capstf.cli", "train", "--dataset", "mnist", "--data-dir", "sample",
            "--model-dir", str(model_dir), "--steps", str(steps), "--batch-size", "16", "--checkpoint-every", "500",
            "--precision", "float32", "--set", "model.conv1_filters=16", "--set", "model.primary_caps_types=4",
            "--set", "train.log_every=1"]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def test_sigterm_checkpoints_the_current_step_and_the_same_command_resumes(tmp_path):
    straight = capstf_train(tmp_path / "straight", 200)
    assert straight.wait(timeout=300) == 0
    run = capstf_train(tmp_path / "stopped", 200)
    events = tmp_path / "stopped" / "train"
    deadline = time.time() + 240
    while time.time() < deadline and not (events.is_dir() and any(p.stat().st_size > 2000 for p in events.iterdir())):
        time.sleep(0.2)  # TensorBoard scalars appear once steps run
    run.send_signal(signal.SIGTERM)
    out, err = run.communicate(timeout=120)
    assert run.returncode == 143, err
    assert "stopped by SIGTERM after step" in err and "rerun the same command to resume" in err
    stopped_at = list_checkpoints(tmp_path / "stopped")[-1][0]
    assert 0 < stopped_at < 200  # the step it was at: no checkpoint is scheduled before 500
    resumed = capstf_train(tmp_path / "stopped", 200)
    assert resumed.wait(timeout=300) == 0
    cfg = small_config(settings={"model.conv1_filters": 16, "model.primary_caps_types": 4})
    (step_a, a), (step_b, b) = weights(tmp_path / "straight", cfg), weights(tmp_path / "stopped", cfg)
    assert step_a == step_b == 200
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, atol=1e-5)


def test_a_sigterm_while_the_data_loads_stops_at_once_with_the_preemption_exit(tmp_path, monkeypatch):
    import capstf.train as train_module
    from capstf.errors import Preempted
    load = train_module.load_training_split

    def load_then_get_a_sigterm(*args):
        os.kill(os.getpid(), signal.SIGTERM)  # delivered while the digits load
        return load(*args)
    monkeypatch.setattr(train_module, "load_training_split", load_then_get_a_sigterm)
    with pytest.raises(Preempted, match="stopped by SIGTERM before training began") as stopped:
        train(small_config(steps=3), tmp_path / "run", quiet=True)
    assert stopped.value.exit_code == 143 and not list_checkpoints(tmp_path / "run")
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone with the run


def test_a_sigterm_during_an_evaluation_cuts_it_short_and_checkpoints_the_step_evaluated(tmp_path, monkeypatch, capsys):
    import capstf.train as train_module
    from capstf.errors import Preempted
    make_dataset, evaluated = train_module.make_dataset, []

    def evaluation_that_gets_a_sigterm(cfg, examples, split, batch_size, *args, **kwargs):
        data = make_dataset(cfg, examples, split, batch_size, *args, **kwargs)
        if split != "test" or batch_size != 100:  # not the per-epoch evaluation
            return data

        def batches():
            for i, batch in enumerate(data):
                evaluated.append(i)
                if i == 1:
                    os.kill(os.getpid(), signal.SIGTERM)  # arrives once the first batch is scored
                yield batch
        return batches()
    monkeypatch.setattr(train_module, "make_dataset", evaluation_that_gets_a_sigterm)
    # 5 batches of 100 after each epoch; 100 training digits: an epoch is 3 steps
    cfg = small_config(steps=10, eval_examples=500, settings={"data.validation_digits": 4900})
    with pytest.raises(Preempted, match="stopped by SIGTERM after step 3 of 10"):
        train(cfg, tmp_path, quiet=True)
    assert evaluated == [0, 1]  # 5 batches to score; the second, which came with the request, was not
    assert "step 3: the validation evaluation was cut short by SIGTERM" in capsys.readouterr().out
    assert list_checkpoints(tmp_path)[-1][0] == 3  # one process: no other worker to tell, no step more


def test_export_verifies_on_the_digits_named_by_data_dir(tmp_path):
    train(small_config(steps=1), tmp_path, quiet=True)
    saved = json.loads((tmp_path / "config.json").read_text())
    saved["data"]["data_dir"] = str(tmp_path / "gone")  # the training data is not here any more
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(CapstfError, match="does not exist"):
        export(tmp_path, tmp_path / "out", formats=("savedmodel",))
    report = export(tmp_path, tmp_path / "out", formats=("savedmodel",), data_dir="sample")
    from capstf.data.sources import load_examples
    images = load_examples("sample", "test").images[:64, ..., None].astype(np.float32) / 255
    expected = model_from_checkpoint_files(tmp_path, 1)(images)["probabilities"].numpy()
    recomputed = differences_in_exported_files(tmp_path / "out", images, expected)
    assert report["verified_on"] == "64 real mnist test examples" and set(recomputed) == {"savedmodel"}
    assert report["savedmodel"]["max_abs_difference"]["probabilities"] == pytest.approx(recomputed["savedmodel"], abs=1e-6)
