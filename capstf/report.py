"""`capstf report`: the generated parts of README.md and docs/, from the run records in results/.

A page asks for a generated part with a pair of marker lines; what lies between them is rewritten:

    <!-- report runs NAME: GLOB -->         or    <!-- report settings -->
    <!-- end report -->                           <!-- end report -->

`settings` is the reference of every setting (capstf.config's dataclasses): its default, the
values it takes and the comment beside it in the source. For `runs`, GLOB (from the checkout's root, e.g. results/mnist-cosine/validation-*.json) names run records
(capstf.records). In their place come the runs' curves, drawn to docs/plots/NAME.png, and a table:
each run's final accuracy and errors, its settings, seed, hardware, length and training time, and
a link to its record. What every run shares (recipe, settings, what it was scored on) is said
once above the table. A figure in the docs is then a record's, never one typed by hand: add or
correct a record and run `capstf report`; with nothing new it changes no file.
"""
import dataclasses
import inspect
import io
import json
import os
import re
import statistics
import tokenize
from pathlib import Path
from typing import Dict, List

from capstf import config as config_lib
from capstf.errors import CapstfError
from capstf.files import write_atomically
from capstf.records import curves_png, duration, read_run_record

PAGES = ("README.md", "docs/*.md")
PLOTS = "docs/plots"
BLOCK = re.compile(r"^<!-- report (?:runs (?P<name>[a-z0-9-]+): (?P<glob>\S+)|(?P<settings>settings)) -->\n"
                   r".*?^<!-- end report -->$", re.DOTALL | re.MULTILINE)
OPENING = re.compile(r"^<!-- report\b.*$", re.MULTILINE)


def write_report(root=".", check=False) -> List[str]:
    """Rewrites every generated part of the pages of the checkout at `root`, and their plots;
    returns the files that changed, relative to root (check=True: the files that would change,
    writing nothing)."""
    root = Path(root)
    if not (root / "results").is_dir():
        raise CapstfError(f"{root.resolve()} has no results/ folder: run capstf report in a capstf checkout, or give --root.")
    outputs: Dict[Path, bytes] = {}
    for page in sorted({p for pattern in PAGES for p in root.glob(pattern)}):
        text = page.read_text()
        _check_markers(page, text)
        outputs[page] = BLOCK.sub(lambda block: _settings_block(block) if block["settings"]
                                  else _runs_block(root, page, block, outputs), text).encode()
    changed = [path for path, data in outputs.items() if not path.is_file() or path.read_bytes() != data]
    if not check:
        for path in changed:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(path, lambda scratch: scratch.write_bytes(outputs[path]))
    return [str(path.relative_to(root)) for path in changed]


def _check_markers(page: Path, text: str):
    """Every opening marker must be a well-formed one with its end: a typo would silently leave
    a stale part in place."""
    well_formed = {m.start() for m in BLOCK.finditer(text)}
    for opening in OPENING.finditer(text):
        if opening.start() not in well_formed:
            line = text.count("\n", 0, opening.start()) + 1
            raise CapstfError(f"{page}:{line}: expected '<!-- report runs NAME: GLOB -->' or '<!-- report "
                              f"settings -->' and, on a later "
                              f"line, '<!-- end report -->'; found {opening.group()!r}.")


def _runs_block(root: Path, page: Path, block: re.Match, outputs: Dict[Path, bytes]) -> str:
    name, pattern = block["name"], block["glob"]
    paths = sorted(root.glob(pattern), key=lambda path: path.stem)  # a-b before a-b-seed1
    if not paths:
        raise CapstfError(f"{page}: '<!-- report runs {name}: {pattern} -->' names no record: no file matches {pattern}.")
    plot = root / PLOTS / f"{name}.png"
    if plot in outputs:
        raise CapstfError(f"{page}: two generated parts are named {name}; each needs a name of its own (its plot's).")
    records = {path.stem: read_run_record(path) for path in paths}
    outputs[plot] = curves_png(
        {stem: (range(1, r["epochs"] + 1), r["accuracy_percent_after_each_epoch"]) for stem, r in records.items()},
        xlabel="epochs", ylabel="accuracy (%)")
    return "\n".join([block.group().splitlines()[0], "", f"![{name}]({_link(page, plot)})", "",
                      *_runs_table(page, paths, list(records.values())), "", "<!-- end report -->"])


def _runs_table(page: Path, paths: List[Path], records: List[dict]) -> List[str]:
    settings = [{"recipe": r["recipe"], **r["settings"]} for r in records]
    shared = {k: v for k, v in settings[0].items() if all(s.get(k) == v for s in settings)}
    scored_on = sorted({r["scored_on"] for r in records})
    per_run_scoring = len(scored_on) > 1  # a column of its own; else said once
    lines = [("Every run: " if len(records) > 1 else "The run: ") + ", ".join(f"`{k}={v}`" for k, v in shared.items())
             + ("." if per_run_scoring else f"; scored on {scored_on[0]}."), "",
             "| run | settings | seed | hardware | epochs | final accuracy | errors | training time |"
             + (" scored on |" if per_run_scoring else ""),
             "| --- " * (8 + per_run_scoring) + "|"]
    for path, record, own in zip(paths, records, settings):
        differing = ", ".join(f"`{k}={v}`" for k, v in own.items() if k not in shared) or "-"
        accuracy = record["accuracy_percent_after_each_epoch"][-1]
        errors = round((100 - accuracy) / 100 * record["examples_scored"])
        lines.append(f"| [{path.stem}]({_link(page, path)}) | {differing} | {record['seed']} | {record['hardware']} | "
                     f"{record['epochs']} | {accuracy:.2f}% | {errors} of {record['examples_scored']:,} | "
                     f"{_training_time(record)} |" + (f" {record['scored_on']} |" if per_run_scoring else ""))
    notes = [f"- {path.stem}: {record['note']}" for path, record in zip(paths, records) if record.get("note")]
    return lines + _seeds_summary(records, settings, shared) + ([""] + notes if notes else [])


def _training_time(record: dict) -> str:
    return "not kept" if record["train_seconds"] is None else duration(record["train_seconds"])


def _seeds_summary(records: List[dict], settings: List[dict], shared: dict) -> List[str]:
    """The mean and standard deviation over the runs that differ from each other in seed alone
    (those with no setting of their own), as the paper reports a figure over trials."""
    runs = [r for r, own in zip(records, settings) if own.keys() == shared.keys()]
    if len(runs) < 2 or len({r["scored_on"] for r in runs}) > 1:
        return []
    finals = [r["accuracy_percent_after_each_epoch"][-1] for r in runs]
    seeds = ", ".join(str(r["seed"]) for r in runs)
    return ["", f"Over the {len(runs)} runs with no setting of their own (seeds {seeds}): accuracy "
                f"**{statistics.mean(finals):.2f} +- {statistics.stdev(finals):.2f}%**, error "
                f"{100 - statistics.mean(finals):.2f} +- {statistics.stdev(finals):.2f}% (standard deviation over runs, n-1)."]


def _settings_block(block: re.Match) -> str:
    lines = [block.group().splitlines()[0], ""]
    for section, cls in (("data", config_lib.DataConfig), ("model", config_lib.ModelConfig),
                         ("train", config_lib.TrainConfig)):
        comments = field_comments(cls)
        lines += [f"| `[{section}]` setting | default | values | what it is |", "| --- | --- | --- | --- |"]
        for field in dataclasses.fields(cls):
            key = f"{section}.{field.name}"
            what = comments.get(field.name, "").replace("|", "\\|")  # a table cell's own bars
            lines.append(f"| `{key}` | `{json.dumps(field.default)}` | {_values(key, field.type)} | {what} |")
        lines.append("")
    return "\n".join(lines + ["<!-- end report -->"])


def _values(key: str, kind) -> str:
    """What `key` accepts, as capstf.config.validate checks it."""
    if key in config_lib.CHOICES:
        return ", ".join(f"`{choice}`" for choice in config_lib.CHOICES[key])
    ranges = {**dict.fromkeys(config_lib.AT_LEAST_1, " >= 1"), **dict.fromkeys(config_lib.AT_LEAST_0, " >= 0"),
              **dict.fromkeys(config_lib.FROM_0_BELOW_1, " in [0, 1)")}
    return config_lib.TYPE_NAMES[kind] + ranges.get(key, "")


def field_comments(cls) -> Dict[str, str]:
    """{field: the comment beside it in cls's source}, with the comment lines aligned below it."""
    source = inspect.getsource(cls)
    comments, field, column = {}, None, None
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.NAME and token.start[1] == 4 and token.line.strip().split(":")[0] == token.string:
            field, column = token.string, None  # a field's line begins (4 spaces in, "name: type = ...")
        elif token.type == tokenize.COMMENT and field:
            starts_line = token.line[:token.start[1]].strip() == ""
            if not starts_line and column is None:
                comments[field], column = token.string[1:].strip(), token.start[1]
            elif starts_line and token.start[1] == column:  # its comment, continued
                comments[field] += " " + token.string[1:].strip()
            else:  # a comment of its own, before the next fields
                field = None
    return comments


def _link(page: Path, target: Path) -> str:
    """target's path as a link from page."""
    return Path(os.path.relpath(target, page.parent)).as_posix()
