"""`capstf study NAME`: one of the paper's experiments, every training run of it, as one command.

A study is a TOML file in pipelines/studies/ (table1.toml, affnist.toml):

    title = "..."                      # the caption of results.md
    metric = "error"                   # what each cell reports, in percent: error | accuracy
    match_checkpoints_on = "..."       # optional: compare runs at matched accuracy on this test set
    [test]                             # how runs are scored: partners_per_digit, limit
    [runlocal]                         # settings that shrink every run (--runlocal); "test.*" too
    [runs.NAME]                        # one training run each:
    recipe = "mnist"                   #   a recipe in pipelines/
    set = { "model.routing_iters" = 1 }  #   and the settings that make this run
    row = "CapsNet, routing 1"         #   its row in the paper's table
    paper = { mnist = 0.34 }           #   test set -> the paper's figure; each is scored

Run NAME trains in <runs dir>/<study>/NAME/ (a rerun resumes it; a scored run is skipped), is
scored on its test sets, and <runs dir>/<study>/results.md and results.json put every figure
beside the paper's, with the examples seen and the training time behind it.

With match_checkpoints_on, every run keeps all its checkpoints and each is scored on every test
set; the runs are then compared at the checkpoints whose accuracy on that test set is closest to
the highest level all runs reach, so no run wins by being trained longer.
"""
import dataclasses
import tomllib
from importlib import resources
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence

from capstf import config as config_lib
from capstf.checkpoints import list_checkpoints, training_progress
from capstf.errors import CapstfError
from capstf.evaluate import measure
from capstf.files import read_json, write_json
from capstf.train import train

METRICS = ("error", "accuracy")
TEST_SETTINGS = {"partners_per_digit": 0, "limit": 0}  # 0: the data set's own
KEEP_EVERY_CHECKPOINT = 1_000_000


@dataclasses.dataclass
class Run:
    name: str
    recipe: str
    settings: Dict[str, object]
    row: str
    paper: Dict[str, float]  # test set -> the paper's figure, in percent


@dataclasses.dataclass
class Study:
    name: str
    title: str
    metric: str
    runs: Dict[str, Run]
    test: Dict[str, int]
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
    _check_keys(raw, {"title", "metric", "match_checkpoints_on", "test", "runlocal", "runs"}, where)
    if raw.get("metric", "error") not in METRICS:
        raise CapstfError(f"{where}: metric must be one of {', '.join(METRICS)}.")
    test = {**TEST_SETTINGS, **raw.get("test", {})}
    _check_keys(test, set(TEST_SETTINGS), f"{where} [test]")
    runs = {}
    for run_name, spec in raw.get("runs", {}).items():
        _check_keys(spec, {"recipe", "set", "row", "paper"}, f"{where} [runs.{run_name}]")
        if not isinstance(spec.get("recipe"), str) or not spec.get("paper"):
            raise CapstfError(f"{where} [runs.{run_name}]: needs a recipe and the paper's figures (paper = {{...}}).")
        runs[run_name] = Run(run_name, spec["recipe"], dict(spec.get("set", {})), spec.get("row", run_name),
                             dict(spec["paper"]))
    if not runs:
        raise CapstfError(f"{where} lists no [runs.NAME].")
    match_on = raw.get("match_checkpoints_on", "")
    if match_on and any(match_on not in run.paper for run in runs.values()):
        raise CapstfError(f"{where}: every run must be scored on {match_on}, the test set it is matched on.")
    return Study(path.stem if source is path else name, raw.get("title", name), raw.get("metric", "error"),
                 runs, test, dict(raw.get("runlocal", {})), match_on)


def _check_keys(table, allowed, where):
    unknown = set(table) - set(allowed)
    if unknown:
        raise CapstfError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; allowed: {', '.join(sorted(allowed))}.")


def run_config(study: Study, run: Run, data_dir=None, runlocal=False, overrides: Optional[Mapping] = None):
    """The resolved Config of one run: its recipe, its settings, --runlocal, then the flags."""
    settings = dict(run.settings)
    if runlocal:
        settings.update({k: v for k, v in study.runlocal.items() if not k.startswith("test.")})
    if study.match_checkpoints_on:
        settings["train.keep_checkpoints"] = KEEP_EVERY_CHECKPOINT
    if data_dir is not None:
        settings["data.data_dir"] = data_dir
    settings.update(overrides or {})
    return config_lib.resolve(run.recipe, settings, runlocal=runlocal)


def test_settings(study: Study, runlocal: bool) -> Dict[str, int]:
    local = {k[len("test."):]: v for k, v in study.runlocal.items() if k.startswith("test.")} if runlocal else {}
    settings = {**study.test, **local}
    _check_keys(settings, set(TEST_SETTINGS), f"Study {study.name} [runlocal]")
    return settings


def score_checkpoint(run: Run, run_dir: Path, test: Mapping, checkpoint=None) -> Dict[str, float]:
    """{test set: accuracy, "parameters": the model's} of one checkpoint (default: the newest)."""
    scores = {}
    for test_set in run.paper:
        metrics = measure(run_dir, test_set, split="test", limit=test["limit"],
                          partners_per_digit=test["partners_per_digit"] or None, checkpoint=checkpoint)
        scores[test_set], scores["parameters"] = metrics["accuracy"], metrics["parameters"]
    return scores


def score_every_checkpoint(run: Run, run_dir: Path, test: Mapping, log) -> Dict[int, dict]:
    """{step: {test set: accuracy}} for every checkpoint; scores are kept in the run dir, so a
    rerun scores only the checkpoints it has not scored yet."""
    cache = run_dir / "checkpoint_scores.json"
    scores = {int(k): v for k, v in read_json(cache).items()} if cache.is_file() else {}
    for step, path in list_checkpoints(run_dir):
        if step not in scores:
            scores[step] = {"checkpoint": path, **score_checkpoint(run, run_dir, test, path)}
            log(f"{run.name}: step {step}: " + ", ".join(f"{t} {scores[step][t]:.4f}" for t in run.paper))
            write_json(cache, scores, indent=1)
    return scores


def matched_steps(scores_by_run: Mapping[str, Mapping[int, dict]], test_set: str):
    """(level, {run: step}): the highest accuracy on test_set that every run reaches, and for
    each run its checkpoint closest to that level (the earliest of equally close ones)."""
    level = min(max(s[test_set] for s in scores.values()) for scores in scores_by_run.values())
    return level, {run: min(scores, key=lambda step: (abs(scores[step][test_set] - level), step))
                   for run, scores in scores_by_run.items()}


def run_study(name, runs_dir="runs", data_dir=None, runlocal=False, only: Sequence[str] = (),
              overrides: Optional[Mapping] = None, log=print) -> dict:
    """Trains and scores the study's runs (or those in `only`); writes results.md and .json."""
    study = load_study(name)
    unknown = [r for r in only if r not in study.runs]
    if unknown:
        raise CapstfError(f"--only {','.join(unknown)}: study {study.name} has the runs {', '.join(study.runs)}.")
    test = test_settings(study, runlocal)
    out_dir = Path(runs_dir) / study.name
    configs = {run.name: run_config(study, run, data_dir, runlocal, overrides)  # every config checked first
               for run in study.runs.values() if not only or run.name in only}
    for run_name, cfg in configs.items():
        run, run_dir = study.runs[run_name], out_dir / run_name
        record_path = run_dir / "study_run.json"
        if record_path.is_file():
            log(f"{run_name}: trained and scored earlier ({record_path}); skipped.")
            continue
        log(f"{run_name}: training {cfg.recipe} in {run_dir}")
        train(cfg, run_dir)
        record = {"run": run_name, "recipe": cfg.recipe, "settings": run.settings, "overrides": dict(overrides or {})}
        if study.match_checkpoints_on:
            record["checkpoint_scores"] = score_every_checkpoint(run, run_dir, test, log)
        else:
            step, path = list_checkpoints(run_dir)[-1]
            record["checkpoint_scores"] = {step: {"checkpoint": path, **score_checkpoint(run, run_dir, test, path)}}
        write_json(record_path, record, indent=1)
    results = collect_results(study, out_dir, test)
    write_json(out_dir / "results.json", results)
    (out_dir / "results.md").write_text(results_markdown(results))
    return results


def collect_results(study: Study, out_dir: Path, test: Mapping) -> dict:
    """Every scored run's figures beside the paper's (runs not yet scored are listed as such)."""
    records, overrides = {}, {}
    for run_name in study.runs:
        path = out_dir / run_name / "study_run.json"
        if path.is_file():
            record = read_json(path)
            records[run_name] = {int(k): v for k, v in record["checkpoint_scores"].items()}
            overrides[run_name] = record.get("overrides", {})  # records before 2026-11-26 lack them
    if study.match_checkpoints_on and len(records) == len(study.runs):
        level, steps = matched_steps(records, study.match_checkpoints_on)
    else:
        level, steps = None, {run: max(scores) for run, scores in records.items()}
    cells = []
    for run in study.runs.values():
        if run.name not in records:
            cells += [{"run": run.name, "row": run.row, "test_set": t, "paper_percent": p, "measured_percent": None}
                      for t, p in run.paper.items()]
            continue
        scores = records[run.name][steps[run.name]]
        examples, seconds = training_progress(scores["checkpoint"])
        for test_set, paper in run.paper.items():
            accuracy = scores[test_set]
            measured = 100 * (1 - accuracy) if study.metric == "error" else 100 * accuracy
            cells.append({"run": run.name, "row": run.row, "test_set": test_set, "paper_percent": paper,
                          "measured_percent": round(measured, 3), "parameters": scores["parameters"],
                          "step": steps[run.name], "overrides": overrides[run.name],
                          "examples_seen": examples, "train_seconds": round(seconds, 1)})
    return {"study": study.name, "title": study.title, "metric": study.metric, "test": dict(test),
            "matched_on": study.match_checkpoints_on or None,
            "matched_level_percent": None if level is None else round(100 * level, 3), "cells": cells}


def results_markdown(results: Mapping) -> str:
    lines = [f"# {results['title']}", ""]
    if results["matched_on"]:
        level = results["matched_level_percent"]
        lines += [f"Runs compared at their checkpoints closest to {level}% on {results['matched_on']}, the highest "
                  f"accuracy every run reached." if level is not None else
                  "Not every run is scored yet: no matched comparison.", ""]
    lines += [f"| row | test set | measured {results['metric']} (%) | paper (%) | parameters | step | examples seen "
              "| training time | run |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for c in results["cells"]:
        if c["measured_percent"] is None:
            lines.append(f"| {c['row']} | {c['test_set']} | not run yet | {c['paper_percent']} | | | | | {c['run']} |")
        else:
            lines.append(f"| {c['row']} | {c['test_set']} | {c['measured_percent']:.2f} | {c['paper_percent']} | "
                         f"{c['parameters']:,} | {c['step']} | {c['examples_seen']:,} | "
                         f"{_duration(c['train_seconds'])} | {c['run']} |")
    trained_with = {c["run"]: c["overrides"] for c in results["cells"] if c.get("overrides")}
    if trained_with:  # a figure from a shortened run must say so
        lines += [""] + [f"Run {run} was trained with `{' '.join(f'--set {k}={v}' for k, v in settings.items())}`."
                         for run, settings in trained_with.items()]
    return "\n".join(lines) + "\n"


def _duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{seconds:.0f} s"
