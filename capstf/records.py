"""Run records, the small JSON files behind published figures (results/), and how figures are
shown: training times as the docs write them, accuracy curves as PNG plots. No TensorFlow here:
`capstf report` and the studies both draw with it."""
import io
from typing import Mapping, Sequence, Tuple

from matplotlib.figure import Figure

from capstf.errors import CapstfError
from capstf.files import read_json

# What every run record holds (train_seconds may be null where a run's own time was not kept;
# an optional "note" says why, or what else a reader must know); results/README.md says more.
RUN_RECORD_KEYS = ("recipe", "settings", "seed", "hardware", "scored_on", "examples_scored", "epochs",
                   "train_seconds", "accuracy_percent_after_each_epoch")


def read_run_record(path) -> dict:
    """The run record in the JSON file `path`; one without a run record's keys is a CapstfError."""
    record = read_json(path)
    missing = [key for key in RUN_RECORD_KEYS if key not in record]
    if missing:
        raise CapstfError(f"{path} is not a run record: it has no {', '.join(missing)}.")
    if len(record["accuracy_percent_after_each_epoch"]) != record["epochs"]:
        raise CapstfError(f"{path}: {len(record['accuracy_percent_after_each_epoch'])} accuracies for "
                          f"{record['epochs']} epochs; a run record has one after each epoch.")
    return record


def duration(seconds: float) -> str:
    """'1 h 34 min' from an hour on, '273 s' below it."""
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{seconds:.0f} s"


def curves_png(curves: Mapping[str, Tuple[Sequence[float], Sequence[float]]], xlabel: str, ylabel: str,
               levels: Mapping[str, float] = None) -> bytes:
    """A PNG of each curve {label: (xs, ys)} as a line with its points, and each of `levels`
    {label: y} (the paper's figures) as a dashed horizontal line. The bytes depend on the inputs
    alone (no date or version is written into the file), so that drawing the same curves again
    gives the same file."""
    figure = Figure(figsize=(10, 4.5), dpi=100, layout="constrained")  # room for the legend beside
    axes = figure.add_subplot()
    for label, (xs, ys) in curves.items():
        axes.plot(xs, ys, marker=".", linewidth=1.2, label=label)
    for label, y in (levels or {}).items():
        axes.axhline(y, linestyle="--", linewidth=1, color="0.4")
        axes.annotate(label, (0, y), xycoords=("axes fraction", "data"), xytext=(4, 3),
                      textcoords="offset points", fontsize=8, color="0.3")
    axes.set_ylim(*_interesting_range([y for _, ys in curves.values() for y in ys], list((levels or {}).values())))
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    png = io.BytesIO()
    figure.savefig(png, format="png", metadata={"Software": None})
    return png.getvalue()


def _interesting_range(values: Sequence[float], levels: Sequence[float]) -> Tuple[float, float]:
    """The y range that shows where the curves end and the levels, not their first steep steps:
    from the lowest of the last three quarters of the values, sorted, to the highest (0-100
    before anything is scored)."""
    ordered = sorted(values)
    if not ordered and not levels:
        return 0, 100
    shown = ordered[len(ordered) // 4:] + list(levels)
    low, high = min(shown), max(shown)
    margin = max(high - low, 0.1) * 0.08
    return low - margin, high + margin

