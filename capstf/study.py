"""`capstf study NAME`: one of the paper's experiments, every training run of it, as one command.

A study is a TOML file in pipelines/studies/ (table1.toml, affnist.toml, mnist-settings.toml):

    title = "..."                      # the caption of results.md
    metric = "error"                   # what each cell reports, in percent: error | accuracy
    match_checkpoints_on = "..."       # optional: compare runs at matched accuracy on this test set
    set = { ... }                      # optional: settings every run shares
    [test]                             # how runs are scored: split (test | validation),
                                       #   partners_per_digit, limit, also_test (below)
    [runlocal]                         # settings that shrink every run (--runlocal); "test.*" too
    [runs.NAME]                        # one training run each:
    recipe = "mnist"                   #   a recipe in pipelines/
    set = { "model.routing_iters" = 1 }  #   and the settings that make this run
    row = "CapsNet, routing 1"         #   its row in the paper's table
    paper = { mnist = 0.34 }           #   test set -> the paper's figure; each is scored
    scored_on = ["mnist"]              #   or the test sets, where the paper gives no figure

With split = "validation" every run is scored on the training digits it holds out
(data.validation_digits), not on the test digits: a study for choosing settings. With also_test =
true as well, each run is then scored on the test digits too, in columns of their own that no
choice reads: its final checkpoint, and its best checkpoint on them (the authors' code scores every
checkpoint on test; this shows how much such a choice flatters a figure).

Run NAME trains in <runs dir>/<study>/NAME/ (a rerun resumes it; a scored run is skipped), is
scored on its test sets, and <runs dir>/<study>/results.md and results.json put every figure
beside the paper's, with the examples seen and the training time behind it; curves.png draws
each run's figure at every checkpoint scored against the examples seen, the paper's as levels.

The paper averages Table 1 over 3 trials; `trials=3` trains each run twice more, from seeds 1
and 2 above its own, in NAME-trial2/ and NAME-trial3/, and reports each figure as the mean and
standard deviation of every scored trial, with each trial's value. `jobs=N` trains up to N
trials at once, each in a process of its own (capstf.parallel): for GPUs, which one run leaves
mostly idle.

With match_checkpoints_on, every run keeps all its checkpoints and each is scored on every test
set; the runs are then compared at the checkpoints whose accuracy on that test set is closest to
the highest level all runs reach (those scored so far), so no run wins by being trained longer.
"""
import dataclasses
import json
import statistics
import sys
import tomllib
from importlib import resources
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

from capstf import config as config_lib
from capstf.catalog import check_dataset_name
from capstf.checkpoints import checkpoint_dir, list_checkpoints, training_progress
from capstf.errors import CapstfError, RuntimeFailure
from capstf.evaluate import measure
from capstf.files import read_json, write_atomically, write_json, write_text
from capstf.parallel import run_in_processes
from capstf.records import curves_png, duration
from capstf.train import train

METRICS = ("error", "accuracy")
TEST_SETTINGS = {"split": "test", "partners_per_digit": 0, "limit": 0, "also_test": False}  # 0: the data set's own
SPLITS = ("test", "validation")
KEEP_EVERY_CHECKPOINT = 1_000_000


@dataclasses.dataclass
class Run:
    name: str
    recipe: str
    settings: Dict[str, object]
    row: str
    test_sets: List[str]     # what it is scored on
    paper: Dict[str, float]  # test set -> the paper's figure, in percent, where the paper gives one


@dataclasses.dataclass
class Study:
    name: str
    title: str
    metric: str
    runs: Dict[str, Run]
    settings: Dict[str, object]  # every run's, under its own
    test: Dict[str, object]
    runlocal: Dict[str, object]
    match_checkpoints_on: str = ""


def study_names():
    return sorted(p.name[:-5] for p in (resources.files("capstf.pipelines") / "studies").iterdir()
                  if p.name.endswith(".toml"))


def load_study(name: str) -> Study:
    """A study by name (a file in pipelines/studies/) or by path to a .toml file."""
    path = Path(name)
    source = path if path.suffix == ".toml" and path.is_file() else \
        resources.files("capstf.pipelines") / "studies" / f"{name}.toml"
    if not source.is_file():
        raise CapstfError(f"No study {name!r}; known studies: {', '.join(study_names())}.")
    try:
        raw = tomllib.loads(source.read_text())
    except tomllib.TOMLDecodeError as e:
        raise CapstfError(f"Study {name}: {e}") from None
    where = f"Study {name}"
    _check_keys(raw, {"title", "metric", "match_checkpoints_on", "set", "test", "runlocal", "runs"}, where)
    if raw.get("metric", "error") not in METRICS:
        raise CapstfError(f"{where}: metric must be one of {', '.join(METRICS)}.")
    test = {**TEST_SETTINGS, **raw.get("test", {})}
    _check_test_settings(test, f"{where} [test]")
    runs = {}
    for run_name, spec in raw.get("runs", {}).items():
        run_where = f"{where} [runs.{run_name}]"
        _check_keys(spec, {"recipe", "set", "row", "paper", "scored_on"}, run_where)
        paper, scored_on = spec.get("paper", {}), spec.get("scored_on")
        names_listed = isinstance(scored_on, list) and all(isinstance(t, str) for t in scored_on)
        if not isinstance(paper, dict) or not (scored_on is None or names_listed):
            raise CapstfError(f'{run_where}: paper is a table (paper = {{ mnist = 0.25 }}) and scored_on a list '
                              f'of test sets (scored_on = ["mnist"]).')
        test_sets = list(paper) if scored_on is None else scored_on
        if not isinstance(spec.get("recipe"), str) or not test_sets:
            raise CapstfError(f"{run_where}: needs a recipe and what it is scored on: the paper's figures "
                              f"(paper = {{...}}) or, where the paper gives none, scored_on = [...].")
        if set(paper) - set(test_sets):
            raise CapstfError(f"{run_where}: the paper's figures are for test sets it is not scored_on.")
        try:  # a misspelt test set would only be found after training
            for test_set in test_sets:
                check_dataset_name(test_set)
        except CapstfError as e:
            raise CapstfError(f"{run_where}: {e}") from None
        runs[run_name] = Run(run_name, spec["recipe"], dict(spec.get("set", {})), spec.get("row", run_name),
                             test_sets, paper)
    if not runs:
        raise CapstfError(f"{where} lists no [runs.NAME].")
    match_on = raw.get("match_checkpoints_on", "")
    if match_on and any(match_on not in run.test_sets for run in runs.values()):
        raise CapstfError(f"{where}: every run must be scored on {match_on}, the test set it is matched on.")
    return Study(path.stem if source is path else name, raw.get("title", name), raw.get("metric", "error"),
                 runs, dict(raw.get("set", {})), test, dict(raw.get("runlocal", {})), match_on)


def _check_keys(table, allowed, where):
    unknown = set(table) - set(allowed)
    if unknown:
        raise CapstfError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; allowed: {', '.join(sorted(allowed))}.")


def run_config(study: Study, run: Run, data_dir=None, runlocal=False, overrides: Optional[Mapping] = None):
    """The resolved Config of one run: its recipe, the study's settings, its own, --runlocal, then the flags."""
    settings = {**study.settings, **run.settings}
    if runlocal:
        settings.update({k: v for k, v in study.runlocal.items() if not k.startswith("test.")})
    if study.match_checkpoints_on or study.test["also_test"]:
        settings["train.keep_checkpoints"] = KEEP_EVERY_CHECKPOINT
    if data_dir is not None:
        settings["data.data_dir"] = data_dir
    settings.update(overrides or {})
    return config_lib.resolve(run.recipe, settings, runlocal=runlocal)


def test_settings(study: Study, runlocal: bool) -> Dict[str, object]:
    local = {k[len("test."):]: v for k, v in study.runlocal.items() if k.startswith("test.")} if runlocal else {}
    settings = {**study.test, **local}
    _check_test_settings(settings, f"Study {study.name} [runlocal]")
    return settings


def _check_test_settings(settings, where):
    """How runs are scored, from [test] or from [runlocal]'s "test.*" on top of it."""
    _check_keys(settings, set(TEST_SETTINGS), where)
    if settings["split"] not in SPLITS:
        raise CapstfError(f"{where}: split must be one of {', '.join(SPLITS)}.")
    if settings["also_test"] and settings["split"] != "validation":
        raise CapstfError(f"{where}: also_test is for a study scored on held-out digits (split = \"validation\").")


def score_checkpoint(run: Run, run_dir: Path, test: Mapping, checkpoint: str) -> Dict[str, object]:
    """One checkpoint's figures: {test set: accuracy}, the model's parameters, and the examples seen
    and seconds of training behind it, kept with the scores so that a record outlives the checkpoint
    and a move of its run dir."""
    examples_seen, train_seconds = training_progress(checkpoint)
    scores = {"checkpoint": checkpoint, "examples_seen": examples_seen, "train_seconds": train_seconds}
    for test_set in run.test_sets:
        metrics = measure(run_dir, test_set, split=test["split"], limit=test["limit"],
                          partners_per_digit=test["partners_per_digit"] or None, checkpoint=checkpoint)
        scores[test_set], scores["parameters"] = metrics["accuracy"], metrics["parameters"]
    return scores


def score_every_checkpoint(run: Run, run_dir: Path, test: Mapping, log,
                           cache_name="checkpoint_scores.json") -> Dict[int, dict]:
    """{step: {test set: accuracy}} for every checkpoint; scores are kept in the run dir (in
    cache_name), so a rerun scores only the checkpoints it has not scored yet."""
    cache = run_dir / cache_name
    scores = {int(k): v for k, v in read_json(cache).items()} if cache.is_file() else {}
    for step, path in list_checkpoints(run_dir):
        if step not in scores:
            scores[step] = score_checkpoint(run, run_dir, test, path)
            log(f"{run_dir.name}: step {step} ({test['split']}): " + ", ".join(f"{t} {scores[step][t]:.4f}" for t in run.test_sets))
            write_json(cache, scores, indent=1)
    return scores


def matched_steps(scores_by_run: Mapping[str, Mapping[int, dict]], test_set: str):
    """(level, {run: step}): the highest accuracy on test_set that every run reaches, and for
    each run its checkpoint closest to that level (the earliest of equally close ones)."""
    level = min(max(s[test_set] for s in scores.values()) for scores in scores_by_run.values())
    return level, {run: min(scores, key=lambda step: (abs(scores[step][test_set] - level), step))
                   for run, scores in scores_by_run.items()}


def trial_dir(out_dir: Path, run_name: str, trial: int) -> Path:
    """Where trial `trial` (from 1) of a run trains: the first where a one-trial study does."""
    return out_dir / (run_name if trial == 1 else f"{run_name}-trial{trial}")


def scored_trials(out_dir: Path, run_name: str):
    """The trials of a run that have a record, in order; every one is reported."""
    extra = (p.name[len(run_name) + len("-trial"):] for p in out_dir.glob(f"{run_name}-trial*"))
    trials = [1] + sorted(int(t) for t in extra if t.isdigit() and int(t) > 1)
    return [t for t in trials if (trial_dir(out_dir, run_name, t) / "study_run.json").is_file()]


def run_study(name, runs_dir="runs", data_dir=None, runlocal=False, only: Sequence[str] = (),
              overrides: Optional[Mapping] = None, log=print, trials: int = 1, trial_numbers: Sequence[int] = (),
              jobs: int = 1) -> dict:
    """Trains and scores the study's runs (or those in `only`), each `trials` times from
    successive seeds (or only the trials numbered in `trial_numbers`, from 1); writes results.md and .json.

    jobs > 1: up to `jobs` trials train at once, each in a process of its own (this module's
    `trial_process`), with its output in <runs dir>/<study>/logs/; trials that fail are named
    once the others are reported.
    """
    study = load_study(name)
    unknown = [r for r in only if r not in study.runs]
    if unknown:
        raise CapstfError(f"--only {','.join(unknown)}: study {study.name} has the runs {', '.join(study.runs)}.")
    if trials < 1:
        raise CapstfError(f"--trials {trials}: a study trains each run at least once.")
    if any(number < 1 for number in trial_numbers):
        raise CapstfError(f"--trial {','.join(map(str, trial_numbers))}: expected trial numbers from 1, e.g. --trial 2,3.")
    test = test_settings(study, runlocal)
    out_dir = Path(runs_dir) / study.name
    first = {run.name: run_config(study, run, data_dir, runlocal, overrides)  # every config checked first
             for run in study.runs.values() if not only or run.name in only}
    holding_none = [run_name for run_name, cfg in first.items() if not cfg.data.validation_digits]
    if test["split"] == "validation" and holding_none:
        raise CapstfError(f"Study {study.name} is scored on held-out training digits, but run(s) "
                          f"{', '.join(holding_none)} hold none: set data.validation_digits.")
    # Trial by trial, so that a study stopped early has whole trials to compare.
    pending = {}  # (run name, trial) -> config
    for number in trial_numbers or range(1, trials + 1):
        for run_name, cfg in first.items():
            record_path = trial_dir(out_dir, run_name, number) / "study_run.json"
            if record_path.is_file():
                log(f"{record_path.parent.name}: trained and scored earlier ({record_path}); skipped.")
            else:
                pending[run_name, number] = cfg if number == 1 else run_config(
                    study, study.runs[run_name], data_dir, runlocal,
                    {**(overrides or {}), "train.seed": cfg.train.seed + number - 1})
    failed = {}
    if jobs > 1 and pending:
        one_trial = dict(name=name, runs_dir=str(runs_dir), data_dir=data_dir, runlocal=runlocal,
                         overrides=dict(overrides or {}))
        failed = run_in_processes(
            [(trial_dir(out_dir, run_name, number).name,
              [sys.executable, "-m", "capstf.study", json.dumps({**one_trial, "only": [run_name], "trial_numbers": [number]})])
             for run_name, number in pending], jobs, out_dir / "logs", log)
    else:
        for (run_name, number), cfg in pending.items():
            train_and_score(study, study.runs[run_name], number, cfg, trial_dir(out_dir, run_name, number),
                            test, overrides, log)
    results = collect_results(study, out_dir, test)
    write_json(out_dir / "results.json", results)
    write_text(out_dir / "results.md", results_markdown(results))
    curves = curves_png(*study_curves(results))
    write_atomically(out_dir / "curves.png", lambda scratch: scratch.write_bytes(curves))
    if failed:
        raise RuntimeFailure(f"{len(failed)} of {len(pending)} trainings failed, the others are in "
                             f"{out_dir / 'results.md'}: " + "; ".join(f"{name} ({why})" for name, why in failed.items())
                             + f". Logs in {out_dir / 'logs'}; rerun to retry them.")
    return results


def train_and_score(study: Study, run: Run, trial: int, cfg, run_dir: Path, test: Mapping, overrides, log):
    """Trains one trial of a run (resuming it) and scores it; its record marks it done."""
    log(f"{run_dir.name}: training {cfg.recipe} (seed {cfg.train.seed}) in {run_dir}")
    train(cfg, run_dir)
    record = {"run": run.name, "trial": trial, "seed": cfg.train.seed, "recipe": cfg.recipe,
              "settings": run.settings, "overrides": dict(overrides or {})}
    if study.match_checkpoints_on:
        record["checkpoint_scores"] = score_every_checkpoint(run, run_dir, test, log)
    else:
        step, path = list_checkpoints(run_dir)[-1]
        record["checkpoint_scores"] = {step: score_checkpoint(run, run_dir, test, path)}
    if test["also_test"]:  # after every choice is made on held-out digits; read by none
        record["test_checkpoint_scores"] = score_every_checkpoint(run, run_dir, {**test, "split": "test"}, log,
                                                                  "checkpoint_test_scores.json")
    write_json(run_dir / "study_run.json", record, indent=1)


def collect_results(study: Study, out_dir: Path, test: Mapping) -> dict:
    """Every scored trial's figures beside the paper's (runs not yet scored are listed as such).
    A matched study is matched within each trial: trial k of every run scored against trial k of the others."""
    records = {}  # trial -> run -> {step: scores}
    seeds, overrides, test_records = {}, {}, {}
    for run_name in study.runs:
        for trial in scored_trials(out_dir, run_name):
            record = read_json(trial_dir(out_dir, run_name, trial) / "study_run.json")
            records.setdefault(trial, {})[run_name] = {int(k): v for k, v in record["checkpoint_scores"].items()}
            seeds[run_name, trial] = record.get("seed")  # older records lack it (and, older still, "overrides")
            overrides[run_name] = record.get("overrides", {})
            test_records[run_name, trial] = record.get("test_checkpoint_scores")  # [test] also_test only
    percent = lambda accuracy: round(100 * (1 - accuracy) if study.metric == "error" else 100 * accuracy, 3)
    levels, steps = {}, {}  # trial -> matched level; trial -> run -> the step reported
    for trial, by_run in sorted(records.items()):
        if study.match_checkpoints_on and len(by_run) >= 2:  # those scored so far (--only picks some)
            levels[trial], steps[trial] = matched_steps(by_run, study.match_checkpoints_on)
        else:
            levels[trial], steps[trial] = None, {run: max(scores) for run, scores in by_run.items()}
    cells = []
    for run in study.runs.values():
        reported = []  # (trial, scores at its reported step, examples seen, training seconds)
        for trial in sorted(t for t in records if run.name in records[t]):
            scores = records[trial][run.name][steps[trial][run.name]]
            if "examples_seen" in scores:
                progress = scores["examples_seen"], scores["train_seconds"]
            else:  # a record from before capstf kept these: read them from its checkpoint, in its run dir
                progress = training_progress(str(checkpoint_dir(trial_dir(out_dir, run.name, trial))
                                                 / Path(scores["checkpoint"]).name))
            reported.append((trial, scores, *progress, test_records[run.name, trial]))
        for test_set in run.test_sets:
            cell = {"run": run.name, "row": run.row, "test_set": test_set, "paper_percent": run.paper.get(test_set),
                    "measured_percent": None, "std_percent": None, "trials": []}
            for trial, scores, examples, seconds, test_scores in reported:
                cell["parameters"], cell["overrides"] = scores["parameters"], overrides[run.name]
                cell["trials"].append({"trial": trial, "seed": seeds[run.name, trial],
                                       "measured_percent": percent(scores[test_set]),
                                       "step": steps[trial][run.name], "examples_seen": examples,
                                       "train_seconds": round(seconds, 1),
                                       "curve": _curve(records[trial][run.name], test_set, percent,
                                                       steps[trial][run.name], examples)})
                if test_scores:
                    final = test_scores[str(steps[trial][run.name])]
                    best_step = max(test_scores, key=lambda step: (test_scores[step][test_set], -int(step)))
                    cell["trials"][-1].update(test_final_percent=percent(final[test_set]),
                                              test_best_percent=percent(test_scores[best_step][test_set]),
                                              test_best_step=int(best_step))
            values = [t["measured_percent"] for t in cell["trials"]]
            if values:
                cell["measured_percent"] = round(statistics.mean(values), 3)
                cell["std_percent"] = round(statistics.stdev(values), 3) if len(values) > 1 else None
            cells.append(cell)
    return {"study": study.name, "title": study.title, "metric": study.metric, "test": dict(test),
            "matched_on": study.match_checkpoints_on or None,
            "matched_levels": [{"trial": trial, "percent": None if level is None else round(100 * level, 3)}
                               for trial, level in levels.items()] if study.match_checkpoints_on else None,
            "cells": cells}


def _curve(scores_by_step: Mapping[int, dict], test_set: str, percent, reported_step: int, reported_examples: int):
    """[[examples seen, figure]] at every checkpoint scored; in records from before capstf kept
    the examples seen with the scores, the reported checkpoint's alone (read from it)."""
    points = {step: s["examples_seen"] for step, s in scores_by_step.items() if "examples_seen" in s}
    points[reported_step] = reported_examples
    return [[points[step], percent(scores_by_step[step][test_set])] for step in sorted(points)]


def results_markdown(results: Mapping) -> str:
    lines = [f"# {results['title']}", ""]
    if results["test"]["split"] == "validation":
        lines += ["Scored on the training digits each run holds out (data.validation_digits), not on the test digits.", ""]
    if results["matched_on"]:
        for level in results["matched_levels"] or [{"trial": 1, "percent": None}]:
            where = f"Trial {level['trial']}: runs" if len(results["matched_levels"]) > 1 else "Runs"
            lines.append(f"{where} compared at their checkpoints closest to {level['percent']}% on "
                         f"{results['matched_on']}, the highest accuracy every run reached."
                         if level["percent"] is not None else f"{where} not compared: fewer than two scored yet.")
        lines.append("")
    on_test = any("test_final_percent" in t for c in results["cells"] for t in c["trials"])
    if on_test:
        lines += ["Then each run was scored on the test digits, after every choice was made: its final checkpoint, "
                  "and, as the authors' code reports, its best checkpoint on them (a choice made on test: "
                  "read it as an upper bound, never to choose).", ""]
    extra = " | test, final (%) | test, best checkpoint (%)" if on_test else ""
    lines += [f"| row | test set | measured {results['metric']} (%) | paper (%){extra} | parameters | step | "
              "examples seen | training time | run |", "| --- " * (9 + 2 * on_test) + "|"]
    for c in results["cells"]:
        paper = "" if c["paper_percent"] is None else c["paper_percent"]
        if c["measured_percent"] is None:
            lines.append(f"| {c['row']} | {c['test_set']} | not run yet | {paper} |" + " |" * (4 + 2 * on_test)
                         + f" {c['run']} |")
            continue
        trials = c["trials"]
        measured = f"{c['measured_percent']:.2f}" if len(trials) == 1 else (
            f"{c['measured_percent']:.2f} +- {c['std_percent']:.2f} ({len(trials)} trials: "
            + ", ".join(f"{t['measured_percent']:.2f}" for t in trials) + ")")
        on_test_cells = "".join(f" | {_each_trial(trials, key, lambda v: '' if v is None else f'{v:.2f}')}"
                                for key in ("test_final_percent", "test_best_percent")) if on_test else ""
        lines.append(f"| {c['row']} | {c['test_set']} | {measured} | {paper}{on_test_cells} | {c['parameters']:,} | "
                     f"{_each_trial(trials, 'step', str)} | {_each_trial(trials, 'examples_seen', '{:,}'.format)} | "
                     f"{_each_trial(trials, 'train_seconds', duration)} | {c['run']} |")
    trained_with = {c["run"]: c["overrides"] for c in results["cells"] if c.get("overrides")}
    if trained_with:  # a figure from a shortened run must say so
        lines += [""] + [f"Run {run} was trained with `{' '.join(f'--set {k}={v}' for k, v in settings.items())}`."
                         for run, settings in trained_with.items()]
    return "\n".join(lines) + "\n"


def study_curves(results: Mapping):
    """What curves.png shows: each run's figure on each test set against the examples seen, at
    every checkpoint scored (one trial: one line), and the paper's figures as levels."""
    curves, levels = {}, {}
    for c in results["cells"]:
        label = f"{c['row']}, {c['test_set']}"
        for t in c["trials"]:
            xs, ys = zip(*t["curve"]) if t["curve"] else ((), ())
            curves[label if len(c["trials"]) == 1 else f"{label}, trial {t['trial']}"] = (xs, ys)
        if c["paper_percent"] is not None:
            levels[f"paper: {label} {c['paper_percent']}%"] = c["paper_percent"]
    return curves, "examples seen", f"{results['metric']} (%)", levels


def _each_trial(trials, key, fmt) -> str:
    """Each trial's `key`, formatted, separated by " / "; one value where they agree (steps, examples)."""
    values = [fmt(t.get(key)) for t in trials]
    return values[0] if len(set(values)) == 1 else " / ".join(values)


def trial_process(argv):
    """One trial of a study run with jobs > 1, in a process of its own:
    python -m capstf.study '{"name": ..., "only": [RUN], "trial_numbers": [K], ...}' (run_study's
    arguments as JSON). Exits as `capstf study` would: a one-line error and its code."""
    try:
        run_study(**json.loads(argv[1]), log=lambda message: print(message, file=sys.stderr, flush=True))
    except CapstfError as e:
        print(f"capstf: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    trial_process(sys.argv)
