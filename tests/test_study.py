"""`capstf study`: the paper's experiments as one command (tiny --runlocal runs on the sample)."""
import json
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import model_from_checkpoint_files

from capstf.checkpoints import list_checkpoints
from capstf.cli import main
from capstf.config import load_saved
from capstf.errors import CapstfError
from capstf.study import collect_results, load_study, matched_steps, run_config, run_study, study_curves
from capstf.study import test_settings as how_runs_are_scored  # not test_*: pytest would collect it


def error_percent(run_dir, images, labels):
    """The run's newest model's error (%) on these unshifted digits."""
    model = model_from_checkpoint_files(run_dir)
    predicted = np.argmax(model(images[..., None].astype(np.float32) / 255)["probabilities"].numpy(), axis=1)
    return 100 * np.mean(predicted != labels)


def error_percent_on_first_test_digits(run_dir, test_digits, count):
    return error_percent(run_dir, test_digits.images[:count], test_digits.labels[:count])


# The paper's Table 1 as printed (Sabour et al. 2017): method, routing iterations,
# reconstruction, MNIST and MultiMNIST test error in percent (None: no figure).
PAPER_TABLE_1 = [("baseline", None, None, 0.39, 8.1),
                 ("capsnet", 1, False, 0.34, None),
                 ("capsnet", 1, True, 0.29, 7.5),
                 ("capsnet", 3, False, 0.35, None),
                 ("capsnet", 3, True, 0.25, 5.2)]


def test_every_table1_run_trains_the_model_of_the_paper_row_whose_figure_it_reports():
    study = load_study("table1")
    reported = []
    for run in study.runs.values():
        model = run_config(study, run).model
        for test_set, figure in run.paper.items():
            column = {"mnist": 3, "multimnist": 4}[test_set]
            rows = [row for row in PAPER_TABLE_1 if row[column] == figure]
            assert len(rows) == 1, (run.name, test_set, figure)  # a figure of the table, in its column
            kind, routing, reconstruction = rows[0][:3]
            assert model.kind == kind, run.name
            if kind == "capsnet":
                assert (model.routing_iters, model.decoder) == (routing, reconstruction), run.name
            assert run.recipe == test_set  # MNIST rows train on MNIST, MultiMNIST rows on MultiMNIST
            reported.append((test_set, figure))
    paper = [(test_set, row[column]) for row in PAPER_TABLE_1
             for test_set, column in (("mnist", 3), ("multimnist", 4)) if row[column] is not None]
    assert sorted(reported) == sorted(paper)  # each of the paper's figures once


def test_the_authors_study_chooses_on_held_out_digits_and_reports_the_test_digits_apart(tmp_path, test_digits):
    results = run_study("authors", tmp_path, "sample", runlocal=True, only=("capsule-biases",), log=lambda msg: None)
    run_dir = tmp_path / "authors" / "capsule-biases"
    assert load_saved(run_dir).model.capsule_biases and load_saved(run_dir).data.validation_digits == 64
    (trial,) = next(c for c in results["cells"] if c["run"] == "capsule-biases")["trials"]
    checkpoints = list_checkpoints(run_dir)
    assert [step for step, _ in checkpoints] == [2, 4]  # every checkpoint kept, to be scored on test
    by_step = {}  # each checkpoint's error on the first 64 test digits (the study's runlocal test.limit)
    for step, _ in checkpoints:
        model = model_from_checkpoint_files(run_dir, step)
        images = test_digits.images[:64, ..., None].astype(np.float32) / 255
        predicted = np.argmax(model(images)["probabilities"].numpy(), axis=1)
        by_step[step] = 100 * np.mean(predicted != test_digits.labels[:64])
    assert trial["test_final_percent"] == pytest.approx(by_step[4], abs=1e-6)
    best = min(by_step, key=lambda step: (by_step[step], step))
    assert (trial["test_best_step"], trial["test_best_percent"]) == (best, pytest.approx(by_step[best], abs=1e-6))
    assert trial["step"] == 4  # the reported figure stays the final checkpoint's, on held-out digits
    # curves.png's line: the held-out figure of each checkpoint scored on them (the last: 4 steps of 8)
    assert trial["curve"] == [[32, trial["measured_percent"]]]
    markdown = (tmp_path / "authors" / "results.md").read_text()
    assert "| test, final (%) | test, best checkpoint (%) |" in markdown and "never to choose" in markdown


def test_table1_trains_scores_and_reports_each_run_beside_the_paper(tmp_path, test_digits):
    only = ("mnist-r1-no-reconstruction", "multimnist-r3")
    results = run_study("table1", tmp_path, "sample", runlocal=True, only=only, log=lambda msg: None)
    cells = {(c["run"], c["test_set"]): c for c in results["cells"]}
    assert len(cells) == 8  # every row of the paper's table, run or not
    mnist = cells["mnist-r1-no-reconstruction", "mnist"]
    assert mnist["paper_percent"] == 0.34 and len(mnist["trials"]) == 1 and mnist["std_percent"] is None
    assert mnist["trials"][0]["step"] == 4 and mnist["trials"][0]["examples_seen"] == 4 * 8
    assert mnist["measured_percent"] == pytest.approx(
        error_percent_on_first_test_digits(tmp_path / "table1" / mnist["run"], test_digits, 64), abs=1e-6)
    assert mnist["parameters"] < 1e6  # runlocal's small model, not the paper's 8.2M
    assert cells["multimnist-r3", "multimnist"]["paper_percent"] == 5.2
    assert cells["multimnist-r3", "multimnist"]["measured_percent"] is not None
    assert cells["mnist-r3", "mnist"]["measured_percent"] is None  # not in --only
    run_config = load_saved(tmp_path / "table1" / "mnist-r1-no-reconstruction").model
    assert run_config.routing_iters == 1 and not run_config.decoder
    markdown = (tmp_path / "table1" / "results.md").read_text()
    assert "| CapsNet, routing 1, no reconstruction | mnist | " in markdown and "not run yet" in markdown
    assert json.loads((tmp_path / "table1" / "results.json").read_text()) == results
    curves, xlabel, ylabel, levels = study_curves(results)
    assert curves["CapsNet, routing 1, no reconstruction, mnist"] == ((32,), (mnist["measured_percent"],))
    assert levels["paper: CapsNet, routing 1, no reconstruction, mnist 0.34%"] == 0.34 and ylabel == "error (%)"
    assert "CapsNet, routing 3, reconstruction, mnist" not in curves  # not run: no line
    assert (tmp_path / "table1" / "curves.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_a_rerun_skips_scored_runs_and_resumes_unfinished_ones(tmp_path):
    only = ("mnist-r1",)
    run_study("table1", tmp_path, "sample", runlocal=True, only=only, overrides={"train.steps": 2},
              log=lambda msg: None)
    run_dir = tmp_path / "table1" / "mnist-r1"
    (run_dir / "study_run.json").unlink()  # as if stopped after training, before scoring
    messages = []
    results = run_study("table1", tmp_path, "sample", runlocal=True, only=only, overrides={"train.steps": 4},
                        log=messages.append)
    cell = next(c for c in results["cells"] if c["run"] == "mnist-r1")
    assert cell["trials"][0]["step"] == 4 and cell["trials"][0]["examples_seen"] == 4 * 8
    assert cell["overrides"] == {"train.steps": 4}  # what the scored run was trained with
    assert "Run mnist-r1 was trained with `--set train.steps=4`." in (tmp_path / "table1" / "results.md").read_text()
    assert [step for step, _ in list_checkpoints(run_dir)] == [2, 4]  # went on from step 2
    record = (run_dir / "study_run.json").stat().st_mtime_ns
    messages.clear()
    run_study("table1", tmp_path, "sample", runlocal=True, only=only, log=messages.append)
    assert any("skipped" in m for m in messages)
    assert (run_dir / "study_run.json").stat().st_mtime_ns == record


def test_a_scored_run_is_reported_after_its_runs_dir_moves_and_its_checkpoints_go(tmp_path):
    first = run_study("table1", tmp_path / "here", "sample", runlocal=True, only=("mnist-r1",), log=lambda msg: None)
    (tmp_path / "here").rename(tmp_path / "there")  # copied to another machine, say
    study, out = load_study("table1"), tmp_path / "there" / "table1"
    test = how_runs_are_scored(study, runlocal=True)
    record_path = out / "mnist-r1" / "study_run.json"
    record = json.loads(record_path.read_text())
    (scores,) = record["checkpoint_scores"].values()
    assert str(tmp_path / "here") in scores["checkpoint"]  # where it was scored
    trial, = next(c for c in first["cells"] if c["run"] == "mnist-r1")["trials"]
    assert trial["examples_seen"] == 4 * 8 and trial["train_seconds"] > 0
    older = {**record, "checkpoint_scores": {  # as capstf wrote records before they kept the progress
        step: {k: v for k, v in s.items() if k not in ("examples_seen", "train_seconds")}
        for step, s in record["checkpoint_scores"].items()}}
    record_path.write_text(json.dumps(older))
    assert collect_results(study, out, test) == first  # read from the checkpoint where it is now
    record_path.write_text(json.dumps(record))
    shutil.rmtree(out / "mnist-r1" / "checkpoints")  # space freed once scored
    assert collect_results(study, out, test) == first


def study_args(tmp_path, *extra):
    """`capstf study table1` on the bundled digits, every run shrunk (--runlocal), into tmp_path."""
    return ["study", "table1", "--runs-dir", str(tmp_path), "--data-dir", "sample", "--runlocal", *extra]


def test_a_results_table_that_cannot_be_written_is_one_line_and_keeps_the_scored_runs(tmp_path):
    results_md = tmp_path / "table1" / "results.md"
    results_md.mkdir(parents=True)  # in the way of the table, as a full disk or a read-only file would be
    result = CliRunner().invoke(main, study_args(tmp_path, "--only", "mnist-r1", "--set", "train.steps=2"))
    assert result.exit_code == 1 and f"capstf: error: Cannot write {results_md}" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)  # no traceback
    assert (tmp_path / "table1" / "mnist-r1" / "study_run.json").is_file()  # the scored run is kept
    assert (tmp_path / "table1" / "results.json").is_file()
    results_md.rmdir()
    rerun = CliRunner().invoke(main, study_args(tmp_path, "--only", "mnist-r1"))
    assert rerun.exit_code == 0 and "mnist-r1: trained and scored earlier" in rerun.output
    assert "| CapsNet, routing 1, reconstruction | mnist | " in results_md.read_text()


def test_trials_train_each_run_from_successive_seeds_and_report_mean_and_spread(tmp_path, test_digits):
    run = "mnist-r1-no-reconstruction"
    results = run_study("table1", tmp_path, "sample", runlocal=True, only=(run,), trials=3, log=lambda msg: None)
    dirs = [tmp_path / "table1" / name for name in (run, f"{run}-trial2", f"{run}-trial3")]
    assert [load_saved(d).train.seed for d in dirs] == [0, 1, 2]
    first_kernels = [model_from_checkpoint_files(d).trainable_weights[0].numpy() for d in dirs]
    assert not np.allclose(first_kernels[0], first_kernels[1])  # the seeds reached the initial weights
    errors = [error_percent_on_first_test_digits(d, test_digits, 64) for d in dirs]
    cell = next(c for c in results["cells"] if c["run"] == run)
    assert [t["measured_percent"] for t in cell["trials"]] == pytest.approx(errors, abs=1e-3)
    assert [t["seed"] for t in cell["trials"]] == [0, 1, 2]
    assert cell["measured_percent"] == pytest.approx(np.mean(errors), abs=1e-3)
    assert cell["std_percent"] == pytest.approx(np.std(errors, ddof=1), abs=1e-3)
    assert f"{np.mean(errors):.2f} +- {np.std(errors, ddof=1):.2f} (3 trials: " in (
        tmp_path / "table1" / "results.md").read_text()
    messages = []  # a rerun asking for fewer trials trains nothing and still reports all three
    again = run_study("table1", tmp_path, "sample", runlocal=True, only=(run,), log=messages.append)
    assert any("skipped" in m for m in messages) and not any(": training " in m for m in messages)
    assert next(c for c in again["cells"] if c["run"] == run)["trials"] == cell["trials"]


def test_trial_trains_only_the_trials_named_each_from_its_own_seed(tmp_path):
    result = CliRunner().invoke(main, study_args(tmp_path, "--only", "mnist-r1", "--trial", "3"))
    assert result.exit_code == 0, result.output
    out = tmp_path / "table1"
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["mnist-r1-trial3"]  # not trials 1 or 2
    assert load_saved(out / "mnist-r1-trial3").train.seed == 2
    cell = next(c for c in json.loads((out / "results.json").read_text())["cells"] if c["run"] == "mnist-r1")
    assert [(t["trial"], t["seed"]) for t in cell["trials"]] == [(3, 2)]
    bad = CliRunner().invoke(main, study_args(tmp_path, "--only", "mnist-r1", "--trial", "2,0"))
    assert bad.exit_code == 2 and bad.output.splitlines()[-1] == (
        "capstf: error: --trial 2,0: expected trial numbers from 1, e.g. --trial 2,3.")


def test_jobs_train_trials_at_once_in_processes_of_their_own_and_name_the_one_that_failed(tmp_path):
    out = tmp_path / "table1"
    out.mkdir()
    (out / "mnist-r1-trial3").write_text("")  # a file where trial 3 would train: that one fails
    result = CliRunner().invoke(main, study_args(tmp_path, "--only", "mnist-r1", "--trials", "3", "--jobs", "2"))
    assert result.exit_code == 1, result.output
    messages = result.stderr.splitlines()
    started = [i for i, m in enumerate(messages) if "training in a process of its own" in m]
    ended = [i for i, m in enumerate(messages) if ": done, " in m or ": failed (" in m]
    assert len(started) == 3 and started[1] < ended[0] < started[2]  # two at a time, the third after one ends
    assert [json.loads((out / name / "study_run.json").read_text())["seed"] for name in ("mnist-r1", "mnist-r1-trial2")] == [0, 1]
    assert "mnist-r1-trial2: training mnist (seed 1)" in (out / "logs" / "mnist-r1-trial2.log").read_text()
    assert messages[-1] == (f"capstf: error: 1 of 3 trainings failed, the others are in {out / 'results.md'}: "
                            f"mnist-r1-trial3 (exit 2: --model-dir {out / 'mnist-r1-trial3'} exists and is not a "
                            f"folder.). Logs in {out / 'logs'}; rerun to retry them.")
    assert "(2 trials: " in (out / "results.md").read_text()  # the two that trained are reported


def test_sigterm_to_a_study_with_jobs_stops_every_training_at_a_checkpoint(tmp_path):
    study = subprocess.Popen([sys.executable, "-m", "capstf.cli", *study_args(
        tmp_path, "--only", "mnist-r1", "--trials", "2", "--jobs", "2", "--set", "train.steps=100000",
        "--set", "train.checkpoint_every=2")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_dirs = [tmp_path / "table1" / name for name in ("mnist-r1", "mnist-r1-trial2")]
    deadline = time.time() + 240
    while time.time() < deadline and not all((d / "checkpoints").is_dir() and list_checkpoints(d) for d in run_dirs):
        time.sleep(0.2)  # both trainings are in their loops, where SIGTERM is checkpointed
    study.send_signal(signal.SIGTERM)
    _, err = study.communicate(timeout=120)
    assert study.returncode == 143, err
    assert err.splitlines()[-1] == ("capstf: error: stopped by SIGTERM; each training in progress checkpointed "
                                    "its last step: rerun the same command to resume.")
    for run_dir in run_dirs:
        stopped = re.search(r"stopped by SIGTERM after step (\d+) of 100000",
                            (tmp_path / "table1" / "logs" / f"{run_dir.name}.log").read_text())
        assert stopped and list_checkpoints(run_dir)[-1][0] == int(stopped[1])  # the step it stopped after
        assert not (run_dir / "study_run.json").exists()  # not scored: a rerun resumes it


def test_affnist_compares_the_models_at_matched_expanded_accuracy_within_each_trial(tmp_path):
    results = run_study("affnist", tmp_path, "sample", runlocal=True, trials=2, log=lambda msg: None)
    for trial, suffix in ((1, ""), (2, "-trial2")):
        scores = {run: {int(step): s for step, s in json.loads(
            (tmp_path / "affnist" / f"{run}{suffix}" / "checkpoint_scores.json").read_text()).items()}
            for run in load_study("affnist").runs}
        assert sorted(scores["capsnet"]) == [2, 4]  # every checkpoint scored, none deleted
        level = min(max(s["expanded-mnist"] for s in run.values()) for run in scores.values())
        assert results["matched_levels"][trial - 1] == {"trial": trial, "percent": pytest.approx(100 * level, abs=1e-3)}
        for cell in results["cells"]:
            run, reported = scores[cell["run"]], cell["trials"][trial - 1]
            closest = min(abs(s["expanded-mnist"] - level) for s in run.values())
            assert abs(run[reported["step"]]["expanded-mnist"] - level) == closest
            assert reported["measured_percent"] == pytest.approx(100 * run[reported["step"]][cell["test_set"]], abs=1e-3)


def test_a_settings_study_scores_each_run_on_the_training_digits_it_holds_out(tmp_path, train_digits, test_digits):
    results = run_study("mnist-settings", tmp_path, "sample", runlocal=True, only=("reference", "routing-final"),
                        log=lambda msg: None)
    held_out_images, held_out_labels = train_digits.images[-64:], train_digits.labels[-64:]  # runlocal holds out 64
    cells = {c["run"]: c for c in results["cells"]}
    errors = {}
    for run, routing_gradients in (("reference", "all"), ("routing-final", "final")):
        run_dir = tmp_path / "mnist-settings" / run
        saved = load_saved(run_dir)
        assert saved.data.validation_digits == 64 and saved.model.routing_gradients == routing_gradients
        errors[run] = error_percent(run_dir, held_out_images, held_out_labels)
        assert cells[run]["measured_percent"] == pytest.approx(errors[run], abs=1e-3)  # 1 digit: 1.5625
        assert cells[run]["paper_percent"] is None  # the paper has no figure for held-out digits
    # the held-out digits are not the test digits, for these models either
    assert any(errors[run] != error_percent_on_first_test_digits(tmp_path / "mnist-settings" / run, test_digits, 64)
               for run in errors)
    markdown = (tmp_path / "mnist-settings" / "results.md").read_text()
    assert "Scored on the training digits each run holds out" in markdown
    assert "| batch 32 | mnist | not run yet |  |" in markdown


def test_a_study_sets_what_all_runs_share_under_each_runs_own_settings():
    study = load_study("mnist-settings")
    batch_32 = run_config(study, study.runs["batch-32"])
    assert (batch_32.data.validation_digits, batch_32.train.batch_size, batch_32.train.checkpoint_every) == (5000, 32, 1718)
    reference = run_config(study, study.runs["reference"])
    assert (reference.data.validation_digits, reference.train.batch_size, reference.train.checkpoint_every) == (5000, 64, 859)


def test_a_matched_study_with_some_runs_scored_matches_those_among_themselves(tmp_path):
    study = load_study("affnist")  # four runs; two of them scored, as after --only capsnet,cnn
    scores = {"capsnet": {2: 0.95, 4: 0.99}, "cnn": {2: 0.97, 4: 0.98}}
    for run, by_step in scores.items():
        (tmp_path / run).mkdir()
        (tmp_path / run / "study_run.json").write_text(json.dumps({"run": run, "trial": 1, "seed": 0, "checkpoint_scores": {
            step: {"checkpoint": f"ckpt-{step}", "examples_seen": step, "train_seconds": 1.0, "parameters": 1,
                   "expanded-mnist": accuracy, "affnist": accuracy - 0.1} for step, accuracy in by_step.items()}}))
    results = collect_results(study, tmp_path, how_runs_are_scored(study, False))
    assert results["matched_levels"] == [{"trial": 1, "percent": 98.0}]  # the highest both reach
    steps = {c["run"]: c["trials"][0]["step"] for c in results["cells"] if c["trials"]}
    assert steps == {"capsnet": 4, "cnn": 4}  # 0.99 and 0.98 are the closest to 0.98
    assert {c["run"] for c in results["cells"] if not c["trials"]} == {"cnn-two-pools", "cnn-no-pooling"}


def test_matched_steps_pick_the_checkpoints_closest_to_the_level_both_reach():
    scores = {"capsnet": {1: {"e": 0.90}, 2: {"e": 0.955}, 3: {"e": 0.99}},
              "cnn": {1: {"e": 0.93}, 2: {"e": 0.96}, 3: {"e": 0.95}}}
    level, steps = matched_steps(scores, "e")
    assert level == 0.96 and steps == {"capsnet": 2, "cnn": 2}


def test_the_affnist_cnn_has_a_similar_number_of_parameters_to_the_capsnet():
    from capstf.config import resolve
    from capstf.model import build_model
    study = load_study("affnist")
    counts = {name: build_model(resolve(run.recipe, run.settings).model).count_params()
              for name, run in study.runs.items()}
    assert counts["capsnet"] == 13_475_648
    assert abs(counts["cnn"] / counts["capsnet"] - 1) < 0.01
    # The CNNs others compared with, on 40x40 inputs, their layers counted by hand:
    two_pools = (5 * 5 * 512 + 512) + (5 * 5 * 512 * 256 + 256) + (10 * 10 * 256 * 1024 + 1024) + (1024 * 10 + 10)
    batch_norm = 4  # per channel: scale, offset, moving mean, moving variance
    no_pooling = (5 * 5 * 256 + batch_norm * 256) + (5 * 5 * 256 * 256 + batch_norm * 256) + \
        (5 * 5 * 256 * 128 + batch_norm * 128) + (28 * 28 * 128 * 328 + 328) + (328 * 192 + 192) + (192 * 10 + 10)
    assert (counts["cnn-two-pools"], counts["cnn-no-pooling"]) == (two_pools, no_pooling)


@pytest.mark.parametrize("content,error", [
    ('[runs.a]\nrecipe = "mnist"\npaper = { mnist = 1.0 }\nepochs = 3\n', r"\[runs.a\]: unknown key\(s\) epochs"),
    ('[runs.a]\nrecipe = "mnist"\npaper = { mnist = 1.0 }\nscored_on = ["affnist"]\n',
     r"\[runs.a\]: the paper's figures are for test sets it is not scored_on"),
    ('[runs.a]\nrecipe = "mnist"\nscored_on = "mnist"\n', r"\[runs.a\]: paper is a table .* and scored_on a list"),
    ('[runs.a]\nrecipe = "mnist"\nscored_on = ["mnits"]\n', r"\[runs.a\]: Unknown data set 'mnits'"),
    ('[test]\nsplit = "train"\n[runs.a]\nrecipe = "mnist"\nscored_on = ["mnist"]\n',
     r"\[test\]: split must be one of test, validation"),
    ('[test]\nalso_test = true\n[runs.a]\nrecipe = "mnist"\nscored_on = ["mnist"]\n',
     r"\[test\]: also_test is for a study scored on held-out digits"),
])
def test_a_bad_study_file_gives_a_one_line_error_naming_the_problem(tmp_path, content, error):
    bad = tmp_path / "bad.toml"
    bad.write_text(content)
    with pytest.raises(CapstfError, match=error):
        load_study(str(bad))


def test_bad_study_input_gives_one_line_errors(tmp_path):
    with pytest.raises(CapstfError, match="known studies: affnist, authors, mnist-settings, table1"):
        load_study("table2")
    with pytest.raises(CapstfError, match="--only mnist-r9: study table1 has the runs"):
        run_study("table1", tmp_path, "sample", only=("mnist-r9",))
    with pytest.raises(CapstfError, match="--trials 0: a study trains each run at least once"):
        run_study("table1", tmp_path, "sample", trials=0)
    bad = tmp_path / "bad.toml"
    bad.write_text('[test]\nsplit = "validation"\n[runs.a]\nrecipe = "mnist"\nscored_on = ["mnist"]\n')
    with pytest.raises(CapstfError, match="scored on held-out training digits, but run\\(s\\) a hold none"):
        run_study(str(bad), tmp_path, "sample", runlocal=True)
    bad.write_text('[runlocal]\n"test.split" = "train"\n[runs.a]\nrecipe = "mnist"\nscored_on = ["mnist"]\n')
    with pytest.raises(CapstfError, match=r"\[runlocal\]: split must be one of test, validation"):
        run_study(str(bad), tmp_path, "sample", runlocal=True)
    assert not (tmp_path / "bad").exists()  # refused before any training
    result = CliRunner().invoke(main, ["study", "table1", "--only", "nope", "--runs-dir", str(tmp_path)])
    assert result.exit_code != 0 and "capstf: error: --only nope" in result.output


@pytest.mark.parametrize("content", ["", '{"run": "mnist-r1", "checkpoint_sc', "[]"])
def test_a_damaged_run_record_is_a_clear_error_naming_it(tmp_path, content):
    study = load_study("table1")
    record = tmp_path / "table1" / "mnist-r1" / "study_run.json"
    record.parent.mkdir(parents=True)
    record.write_text(content)
    with pytest.raises(CapstfError, match=f"^{record} is damaged .*delete it and rerun"):
        collect_results(study, tmp_path / "table1", study.test)
