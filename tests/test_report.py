"""`capstf report`: the docs' result tables and curve plots, generated from run records."""
import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from capstf.cli import main
from capstf.errors import CapstfError
from capstf.report import write_report

CHECKOUT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_record(curve, seed=0, settings=None, train_seconds=5626, scored_on="the first 5,000 test digits"):
    return {"recipe": "mnist-cosine", "settings": {"data.validation_digits": 5000, **(settings or {})},
            "seed": seed, "hardware": "2-core AMD EPYC", "scored_on": scored_on, "examples_scored": 5000,
            "epochs": len(curve), "train_seconds": train_seconds, "accuracy_percent_after_each_epoch": curve}


PAGE = """# Results

Text before.

<!-- report runs mnist-runs: results/mnist/*.json -->
a stale table, typed by hand
<!-- end report -->

Text after.
"""


@pytest.fixture
def checkout(tmp_path):
    """A checkout with two run records and a page asking for their part."""
    (tmp_path / "results" / "mnist").mkdir(parents=True)
    (tmp_path / "docs").mkdir()
    write(tmp_path / "results" / "mnist" / "reference.json", run_record([98.82, 99.3, 99.5]))
    write(tmp_path / "results" / "mnist" / "batch-32.json",
          run_record([98.84, 99.1, 99.68], seed=1, settings={"train.batch_size": 32}, train_seconds=2400))
    (tmp_path / "docs" / "results.md").write_text(PAGE)
    return tmp_path


def write(path, record):
    path.write_text(json.dumps(record))


def generated_part(page_text):
    start = page_text.index("<!-- report runs")
    return page_text[start:page_text.index("<!-- end report -->", start)]


def test_a_generated_part_lists_each_record_with_its_final_accuracy_errors_and_what_sets_it_apart(checkout):
    assert sorted(write_report(checkout)) == ["docs/plots/mnist-runs.png", "docs/results.md"]
    text = (checkout / "docs" / "results.md").read_text()
    assert text.startswith("# Results\n\nText before.\n\n<!-- report runs mnist-runs: results/mnist/*.json -->\n")
    assert text.endswith("<!-- end report -->\n\nText after.\n")
    part = generated_part(text)
    assert "stale" not in part
    assert "![mnist-runs](plots/mnist-runs.png)" in part
    # What both runs share is said once; each row gives what sets its run apart.
    assert "Every run: `recipe=mnist-cosine`, `data.validation_digits=5000`; scored on the first 5,000 test digits." in part
    assert ("| [reference](../results/mnist/reference.json) | - | 0 | 2-core AMD EPYC | 3 | 99.50% | 25 of 5,000 "
            "| 1 h 34 min |") in part
    assert ("| [batch-32](../results/mnist/batch-32.json) | `train.batch_size=32` | 1 | 2-core AMD EPYC | 3 | 99.68% "
            "| 16 of 5,000 | 2400 s |") in part  # under an hour, in seconds
    assert (checkout / "docs" / "plots" / "mnist-runs.png").read_bytes().startswith(PNG_SIGNATURE)


def test_runs_that_differ_in_seed_alone_are_summed_up_as_mean_and_standard_deviation(checkout):
    write(checkout / "results" / "mnist" / "seed-2.json", run_record([99.0, 99.4], seed=2))
    write_report(checkout)
    part = generated_part((checkout / "docs" / "results.md").read_text())
    # reference (99.50) and seed 2 (99.40); batch 32 has a setting of its own, so it is left out
    assert ("Over the 2 runs with no setting of their own (seeds 0, 2): accuracy **99.45 +- 0.07%**, "
            "error 0.55 +- 0.07%") in part


def test_a_run_whose_time_was_not_kept_says_so_and_its_note_follows_the_table(checkout):
    write(checkout / "results" / "mnist" / "batch-32.json",
          {**run_record([99.0]), "train_seconds": None, "note": "four runs shared the GPU"})
    write_report(checkout)
    part = generated_part((checkout / "docs" / "results.md").read_text())
    assert "| 99.00% | 50 of 5,000 | not kept |" in part
    assert "\n- batch-32: four runs shared the GPU\n" in part


def test_runs_scored_on_different_digits_say_so_in_a_column(checkout):
    write(checkout / "results" / "mnist" / "batch-32.json", run_record([99.0], scored_on="the last 5,000 training digits"))
    write_report(checkout)
    part = generated_part((checkout / "docs" / "results.md").read_text())
    assert "| training time | scored on |" in part
    assert part.count("| the last 5,000 training digits |") == 1 and part.count("| the first 5,000 test digits |") == 1


def test_a_second_report_changes_nothing_and_a_changed_record_is_found_by_check(checkout):
    write_report(checkout)
    page, plot = checkout / "docs" / "results.md", checkout / "docs" / "plots" / "mnist-runs.png"
    written = page.read_bytes(), plot.read_bytes()
    assert write_report(checkout) == []
    assert (page.read_bytes(), plot.read_bytes()) == written

    write(checkout / "results" / "mnist" / "reference.json", run_record([98.82, 99.3, 99.44]))
    assert sorted(write_report(checkout, check=True)) == ["docs/plots/mnist-runs.png", "docs/results.md"]
    assert (page.read_bytes(), plot.read_bytes()) == written  # check writes nothing
    write_report(checkout)
    assert "| 99.44% | 28 of 5,000 |" in page.read_text()
    assert plot.read_bytes() != written[1]  # the curve is redrawn from the record


@pytest.mark.parametrize("page, message", [
    ("<!-- report runs mnist-runs: results/mnist/*.json -->\nno end\n", "results.md:1: expected"),
    ("x\n<!-- report mnist-runs results/mnist/*.json -->\n<!-- end report -->\n", "results.md:2: expected"),
    ("<!-- report runs none: results/other/*.json -->\n<!-- end report -->\n", "no file matches results/other/*.json"),
    (PAGE + PAGE, "two generated parts are named mnist-runs"),
])
def test_a_malformed_part_is_an_error_naming_where_it_is(checkout, page, message):
    (checkout / "docs" / "results.md").write_text(page)
    with pytest.raises(CapstfError, match=re.escape(message)):
        write_report(checkout)
    assert (checkout / "docs" / "results.md").read_text() == page


def test_a_record_that_is_not_a_run_record_is_named(checkout):
    record = run_record([99.0, 99.1])
    del record["seed"]
    write(checkout / "results" / "mnist" / "reference.json", record)
    with pytest.raises(CapstfError, match=r"reference.json is not a run record: it has no seed"):
        write_report(checkout)
    write(checkout / "results" / "mnist" / "reference.json", {**record, "seed": 0, "epochs": 3})
    with pytest.raises(CapstfError, match=r"2 accuracies for 3 epochs"):
        write_report(checkout)


def test_the_settings_reference_lists_every_setting_with_its_default_values_and_comment(checkout):
    (checkout / "docs" / "config.md").write_text("# Settings\n\n<!-- report settings -->\n<!-- end report -->\n")
    write_report(checkout)
    text = (checkout / "docs" / "config.md").read_text()
    assert "| `train.batch_size` | `128` | an integer >= 1 | global, over all replicas |" in text
    assert ("| `model.routing_gradients` | `\"all\"` | `all`, `final` | all: through every iteration (Procedure 1); "
            "final: the agreement updates see u_hat as constant |") in text  # a comment's continued lines joined
    assert "| `data.max_contrast_change` | `0.0` | a number in [0, 1) |" in text
    assert "| `model.decoder` | `true` | true or false |" in text
    rows = [line for line in text.splitlines() if line.startswith("| `") and "." in line.split("|")[1]]
    assert len(rows) == 15 + 19 + 17  # data, model and train settings, each once


def test_capstf_report_check_exits_1_while_a_part_is_out_of_date_and_bad_roots_get_one_line(checkout, tmp_path):
    stale = CliRunner().invoke(main, ["report", "--root", str(checkout), "--check"])
    assert stale.exit_code == 1
    assert "2 generated file(s) out of date" in stale.output
    assert CliRunner().invoke(main, ["report", "--root", str(checkout)]).exit_code == 0
    assert CliRunner().invoke(main, ["report", "--root", str(checkout), "--check"]).exit_code == 0

    (tmp_path / "empty").mkdir()
    elsewhere = CliRunner().invoke(main, ["report", "--root", str(tmp_path / "empty")])
    assert elsewhere.exit_code == 2
    assert "has no results/ folder" in elsewhere.output and "Traceback" not in elsewhere.output


def test_the_checkouts_generated_parts_are_up_to_date():
    assert write_report(CHECKOUT, check=True) == []  # else: run `capstf report` and commit what it changed
