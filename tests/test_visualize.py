import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner
from conftest import model_from_checkpoint_files, small_config
from PIL import Image

from capstf import config as config_lib, sheets, visualize
from capstf.cli import main
from capstf.data.datasets import make_dataset
from capstf.data.sources import load_examples
from capstf.train import train

TILE = 28 * sheets.SCALE


def test_reconstruction_figure_has_inputs_over_reconstructions(trained_mnist, tmp_path):
    model_dir, _ = trained_mnist
    result = CliRunner().invoke(main, ["visualize", "reconstructions", "--model-dir", str(model_dir),
                                       "--count", "6", "--out", str(tmp_path / "fig3.png")])
    assert result.exit_code == 0, result.output
    image = Image.open(tmp_path / "fig3.png")
    assert image.size == (6 * (TILE + 2) + 2, 2 * TILE + sheets.CAPTION + 4)


def test_perturbation_grid_has_16_rows_of_11_changing_images(trained_mnist, tmp_path):
    model_dir, cfg = trained_mnist
    info, grid = visualize.perturbations(model_dir, tmp_path / "fig4.png")
    dims = cfg.model.digit_caps_dim
    assert dims == 16 and grid.shape == (dims, 11, 28, 28, 1) and info["rows"] == dims and info["columns"] == 11
    assert Image.open(tmp_path / "fig4.png").size == (11 * (TILE + 2) + 2, dims * (TILE + 2) + 2)
    for row in grid:  # each dimension changes the decoded digit along its row
        assert np.abs(row[0] - row[-1]).max() > 1e-3
    assert np.allclose(np.round(visualize.PERTURBATIONS, 2), np.round(np.linspace(-0.25, 0.25, 11), 2))


def test_overlay_draws_the_input_grey_and_the_two_reconstructions_red_and_green_framing_wrong_pairs():
    size, scale = 36, sheets.SCALE
    images = np.zeros([2, size, size, 1], np.float32)
    images[:, 10:20, 10:20] = 1.0                            # the input's ink
    recon = np.zeros([2, 2, size, size, 1], np.float32)
    recon[:, 0, 0:8, 0:8] = 1.0                              # first digit: top left
    recon[:, 1, 28:36, 28:36] = 0.5                          # second digit: bottom right, half bright
    labels, predictions = np.array([[3, 7], [3, 7]]), np.array([[7, 3], [3, 1]])  # right (any order), wrong
    sheet = np.asarray(visualize.overlay_sheet(images, recon, labels, predictions))
    tile = lambda i, y, x: tuple(sheet[2 + y * scale + 1, 2 + i * (size * scale + 2) + x * scale + 1])
    for i in (0, 1):
        assert tile(i, 15, 15) == (89, 89, 89)               # the input at 0.35 grey
        assert tile(i, 4, 4) == (255, 0, 0)                  # the first reconstruction in red
        assert tile(i, 32, 32) == (0, 128, 0)                # the second in green, at its brightness
        assert tile(i, 24, 4) == (0, 0, 0)                   # nothing
    frame = lambda i: tuple(sheet[2, 2 + i * (size * scale + 2) + 60])  # the tile's top edge
    assert frame(0) == (0, 0, 0) and frame(1) == (255, 80, 80)  # only the wrong pair is framed in red


def test_multimnist_figure_overlays_the_models_reconstructions_of_test_pairs(tmp_path):
    model_dir = tmp_path / "mm"
    cfg = small_config("multimnist", steps=2, checkpoint_every=2)
    train(cfg, model_dir, quiet=True)
    info = visualize.multimnist(model_dir, tmp_path / "fig5.png", count=8)
    # The same figure from the checkpoint's own files and the first 8 test pairs.
    pairs = next(iter(make_dataset(config_lib.load_saved(model_dir).data, load_examples("sample", "test", "multimnist"),
                                   "test", 100, seed=0)))
    out = model_from_checkpoint_files(model_dir)(pairs["image"])
    predictions = tf.math.top_k(out["probabilities"], 2).indices.numpy()[:8]
    expected = visualize.overlay_sheet(pairs["image"].numpy()[:8], out["reconstructions"].numpy()[:8],
                                       pairs["label"].numpy()[:8], predictions)
    drawn = Image.open(tmp_path / "fig5.png")
    # Within one level: the figure's model compiles its routing, this one does not (float rounding).
    assert np.abs(np.asarray(drawn, np.int16) - np.asarray(expected, np.int16)).max() <= 1
    assert (info["width"], info["height"]) == (8 * (36 * sheets.SCALE + 2) + 2, 36 * sheets.SCALE + sheets.CAPTION + 4)


@pytest.mark.parametrize("args, message", [
    (["visualize", "reconstructions", "--model-dir", "/no/model", "--out", "x.png"], "no trained model"),
    (["visualize", "multimnist", "--out", "x.png"], "multimnist"),
    (["visualize", "reconstructions", "--dataset", "multimnist", "--out", "x.png"], "cannot take multimnist"),
    (["visualize", "reconstructions", "--out", "/no/such/folder/x.png"], "does not exist"),
])
def test_clear_errors(trained_mnist, args, message):
    if "--model-dir" not in args:
        args = args[:2] + ["--model-dir", str(trained_mnist[0])] + args[2:]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_reconstruction_row_shows_exactly_the_models_reconstructions(trained_mnist, test_digits):
    from capstf.checkpoints import restore_for_inference
    model_dir, cfg = trained_mnist
    model, _ = restore_for_inference(model_dir, cfg)
    images = test_digits.images[:3, ..., None].astype(np.float32) / 255
    out = model(images)
    predictions = np.argmax(out["probabilities"].numpy(), 1)[:, None]
    sheet = np.asarray(visualize.reconstruction_sheet(images, out["reconstructions"].numpy(),
                                                      test_digits.labels[:3, None], predictions))
    for i in range(3):
        x = 2 + i * (TILE + 2)
        pixels = lambda a: np.kron(np.round(np.clip(a[..., 0], 0, 1) * 255), np.ones((3, 3)))  # as drawn, 3x
        inside = (slice(1, -1), slice(1, -1))  # a misclassified tile is framed in red
        np.testing.assert_array_equal(sheet[2:2 + TILE, x:x + TILE, 0][inside], pixels(images[i])[inside])
        np.testing.assert_array_equal(sheet[2 + TILE:2 + 2 * TILE, x:x + TILE, 0][inside],
                                      pixels(out["reconstructions"].numpy()[i, 0])[inside])
