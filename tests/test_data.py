import errno
import gzip
import shutil

import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner

from capstf.cli import main
from capstf.config import DataConfig
from capstf.data.datasets import affine_warp, ink_box, make_dataset
from capstf.data.sources import Examples, load_examples
from capstf.errors import CapstfError


def take(cfg, digits, split, count, seed=0, **kwargs):
    batch = next(iter(make_dataset(cfg, digits, split, count, seed, limit=count, **kwargs)))
    return {k: v.numpy() for k, v in batch.items()}


def test_sample_is_real_balanced_mnist(train_digits, test_digits):
    assert train_digits.images.shape == (5000, 28, 28) and test_digits.images.shape == (5000, 28, 28)
    assert np.all(np.bincount(train_digits.labels) == 500)


def source_index(digits, image):
    """Index of the digit an unshifted 28x28 image came from."""
    matches = np.where((digits.images == np.round(image * 255).astype(np.uint8)).all(axis=(1, 2)))[0]
    return matches


def test_mnist_test_images_stay_paired_with_their_labels(test_digits):
    batch = take(DataConfig(dataset="mnist"), test_digits, "test", 50)
    for image, label in zip(batch["image"][..., 0], batch["label"]):
        matches = source_index(test_digits, image)
        assert len(matches) and test_digits.labels[matches[0]] == label


def find_shift(image, digits, max_shift):
    """(digit index, dy, dx) such that shifting that digit by (dy, dx), zero-filled, gives image."""
    padded = np.pad(digits.images, [(0, 0), (max_shift, max_shift), (max_shift, max_shift)])
    target = np.round(image * 255).astype(np.uint8)
    for dy in range(-max_shift, max_shift + 1):
        for dx in range(-max_shift, max_shift + 1):
            window = padded[:, max_shift - dy:max_shift - dy + 28, max_shift - dx:max_shift - dx + 28]
            matches = np.where((window == target).all(axis=(1, 2)))[0]
            if len(matches):
                return matches[0], dy, dx
    return None


def test_mnist_shifts_stay_within_bounds_reach_extremes_and_keep_labels(train_digits):
    batch = take(DataConfig(dataset="mnist", max_shift=2), train_digits, "train", 200)
    shifts = []
    for image, label in zip(batch["image"][:60, ..., 0], batch["label"][:60]):
        found = find_shift(image, train_digits, 2)
        assert found is not None, "a training image is not a shifted source digit"
        index, dy, dx = found
        assert train_digits.labels[index] == label
        shifts += [dy, dx]
    assert min(shifts) == -2 and max(shifts) == 2


def test_two_epochs_shift_differently_and_seeds_repeat(train_digits):
    cfg = DataConfig(dataset="mnist", max_shift=2)
    n = len(train_digits.labels)
    first = take(cfg, train_digits, "train", 64)
    again = take(cfg, train_digits, "train", 64)
    np.testing.assert_array_equal(first["image"], again["image"])
    next_epoch = take(cfg, train_digits, "train", 64, start_example=n)
    assert not np.array_equal(first["label"], next_epoch["label"])  # a fresh permutation
    other_seed = take(cfg, train_digits, "train", 64, seed=1)
    assert not np.array_equal(first["image"], other_seed["image"])


def test_resuming_mid_stream_gives_the_same_examples(train_digits):
    cfg = DataConfig(dataset="multimnist", max_shift=4)
    full = take(cfg, train_digits, "train", 96)
    tail = take(cfg, train_digits, "train", 32, start_example=64)
    np.testing.assert_array_equal(full["image"][64:], tail["image"])


def test_multimnist_pairs_differ_in_class_and_canvas_is_clipped_sum(train_digits):
    batch = take(DataConfig(dataset="multimnist", max_shift=4), train_digits, "train", 64)
    assert batch["image"].shape == (64, 36, 36, 1) and batch["components"].shape == (64, 2, 36, 36, 1)
    assert np.all(batch["label"][:, 0] != batch["label"][:, 1])
    np.testing.assert_allclose(batch["image"], np.minimum(batch["components"].sum(1), 1.0), atol=1e-6)
    for components, labels in zip(batch["components"][:10], batch["label"][:10]):
        for component, label in zip(components[..., 0], labels):
            # the 36x36 canvas is the digit padded by 4, shifted by up to 4 px per axis
            found = unshift_canvas(component, train_digits)
            assert found is not None and train_digits.labels[found] == label


def unshift_canvas(component, digits, max_shift=4):
    ys, xs = np.nonzero(component)
    for dy in range(-max_shift, max_shift + 1):
        for dx in range(-max_shift, max_shift + 1):
            top, left = 4 + dy, 4 + dx
            if top < 0 or left < 0 or top + 28 > 36 or left + 28 > 36:
                continue
            crop = component[top:top + 28, left:left + 28]
            if np.isclose(crop.sum(), component.sum()):
                matches = source_index(digits, crop)
                if len(matches):
                    return matches[0]
    return None


def test_multimnist_test_set_is_deterministic_with_partners(test_digits):
    cfg = DataConfig(dataset="multimnist", max_shift=4, partners_per_digit=3)
    a, b = take(cfg, test_digits, "test", 30, seed=5), take(cfg, test_digits, "test", 30, seed=5)
    np.testing.assert_array_equal(a["image"], b["image"])
    # each test digit appears with 3 partners in a row
    first = a["label"][:, 0]
    assert np.all(first[0::3] == first[1::3]) and np.all(first[0::3] == first[2::3])


def test_expanded_mnist_places_digits_anywhere_on_40x40(train_digits):
    batch = take(DataConfig(dataset="expanded-mnist", max_shift=6), train_digits, "train", 200)
    boxes = ink_box(tf.constant(batch["image"][..., 0])).numpy()
    assert batch["image"].shape == (200, 40, 40, 1)
    assert boxes[:, 0].min() < 4 and boxes[:, 2].max() > 35  # reaches near both edges


def test_affine_parameters_stay_in_range_and_digits_stay_inside(test_digits):
    cfg = DataConfig(dataset="affnist")
    n = 64
    u = tf.random.stateless_uniform([6, n], seed=[1, 2])
    params = {"angle": (u[0] * 2 - 1) * 20, "shear": (u[1] * 2 - 1) * 0.2, "scale_x": 0.8 + 0.4 * u[2],
              "scale_y": 0.8 + 0.4 * u[3], "tx": u[4], "ty": u[5]}
    params["tx"] = tf.concat([tf.zeros(n // 2), tf.ones(n // 2)], 0)  # both translation extremes
    digits = tf.constant(test_digits.images[:n], tf.float32) / 255
    warped, forward, translation = affine_warp(digits, params, 40)
    warped = warped.numpy()
    border = np.concatenate([warped[:, 0], warped[:, -1], warped[:, :, 0], warped[:, :, -1]], 1)
    assert border.max() < 1e-3, "ink was cut off at the canvas border"
    assert np.all(warped.max(axis=(1, 2)) > 0.3)
    box = ink_box(tf.constant(warped > 0.05, tf.float32)).numpy()
    assert box[: n // 2, 1].min() <= 2 and box[n // 2:, 3].max() >= 37  # pushed to both sides
    batch = take(cfg, test_digits, "test", 32, seed=3)
    again = take(cfg, test_digits, "test", 32, seed=3)
    np.testing.assert_array_equal(batch["image"], again["image"])
    assert batch["image"].shape == (32, 40, 40, 1)


def copy_sample(tmp_path):
    from capstf.data.sources import SAMPLE_DIR
    for f in SAMPLE_DIR.iterdir():
        shutil.copy(f, tmp_path / f.name)
    return tmp_path


def test_raw_and_gzipped_idx_folders_load(tmp_path):
    folder = copy_sample(tmp_path)
    raw = folder / "t10k-images-idx3-ubyte"
    raw.write_bytes(gzip.decompress((folder / "t10k-images-idx3-ubyte.gz").read_bytes()))
    (folder / "t10k-images-idx3-ubyte.gz").unlink()
    assert load_examples(str(folder), "test").images.shape == (5000, 28, 28)


def damage_compressed_body(gzipped: bytes) -> bytes:
    """Ones over the first deflate block header: zlib itself fails ("invalid block type")."""
    plain = gzip.compress(gzip.decompress(gzipped))  # a 10-byte gzip header, no file name
    return plain[:10] + b"\xff" * 8 + plain[18:]


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.unlink(), "has no train-images"),
    (lambda p: p.write_bytes(gzip.compress(gzip.decompress(p.read_bytes())[:5000])), "truncated"),
    (lambda p: p.write_bytes(b"not a gzip file at all"), "corrupt"),
    (lambda p: p.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + b"\x00" * 20)), "not an MNIST IDX image"),
    (lambda p: p.write_bytes(damage_compressed_body(p.read_bytes())), "corrupt"),
])
def test_damaged_idx_files_give_clear_errors_naming_the_file(tmp_path, damage, message):
    folder = copy_sample(tmp_path)
    damage(folder / "train-images-idx3-ubyte.gz")
    with pytest.raises(CapstfError, match=message) as error:
        load_examples(str(folder), "train")
    assert "train-images" in str(error.value)


def test_images_and_labels_of_different_counts_are_refused(tmp_path):
    folder = copy_sample(tmp_path)
    labels = gzip.decompress((folder / "train-labels-idx1-ubyte.gz").read_bytes())
    short = labels[:4] + (4000).to_bytes(4, "big") + labels[8:8 + 4000]
    (folder / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(short))
    with pytest.raises(CapstfError, match="5000 images but 4000 labels"):
        load_examples(str(folder), "train")


def test_missing_data_dir_names_the_ways_out():
    with pytest.raises(CapstfError, match="--data-dir sample"):
        load_examples("/nonexistent/mnist", "train")


def test_real_affnist_files_are_read_as_they_are(tmp_path, test_digits):
    from scipy.io import savemat
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(7, 40, 40), dtype=np.uint8)
    labels = rng.integers(0, 10, size=7)
    # affNIST's layout: one row-major 40x40 image per column of a [1600, n] matrix
    savemat(tmp_path / "test.mat", {"affNISTdata": {"image": images.reshape(7, 1600).T, "label_int": labels}})
    digits = load_examples(str(tmp_path), "test", "affnist")
    np.testing.assert_array_equal(digits.images, images)
    np.testing.assert_array_equal(digits.labels, labels)
    batch = take(DataConfig(dataset="affnist"), digits, "test", 7)
    np.testing.assert_allclose(batch["image"][..., 0], images / 255.0, atol=1e-6)
    np.testing.assert_array_equal(batch["label"], labels)
    (tmp_path / "test.mat").write_bytes(b"MATLAB 5.0 MAT-file, garbage")
    with pytest.raises(CapstfError, match="not an affNIST .mat file"):
        load_examples(str(tmp_path), "test", "affnist")


def test_each_epoch_shifts_every_digit_afresh(train_digits):
    few = Examples(train_digits.images[::500], train_digits.labels[::500])  # 10 digits: short epochs
    batch = take(DataConfig(dataset="mnist", max_shift=2), few, "train", 40)  # 4 epochs
    shifts = {}
    for image in batch["image"][..., 0]:
        index, dy, dx = find_shift(image, few, 2)
        shifts.setdefault(index, []).append((dy, dx))
    assert sorted(shifts) == list(range(10)) and all(len(s) == 4 for s in shifts.values())
    assert sum(len(set(s)) > 1 for s in shifts.values()) >= 8  # nearly every digit moved between epochs


def orientation_deg(image):
    """The angle of an image's main ink axis (second moments), in degrees."""
    y, x = np.mgrid[:image.shape[0], :image.shape[1]]
    w = image / image.sum()
    dx, dy = x - (w * x).sum(), y - (w * y).sum()
    return np.degrees(0.5 * np.arctan2(2 * (w * dx * dy).sum(), (w * (dx * dx - dy * dy)).sum()))


def test_training_rotation_and_scaling_stay_within_their_bounds(train_digits):
    ones = train_digits.labels == 1  # long thin digits: a well-defined ink axis
    digits = Examples(train_digits.images[ones], train_digits.labels[ones])
    plain = take(DataConfig(dataset="mnist", max_shift=0), digits, "train", 200)
    turned = take(DataConfig(dataset="mnist", max_shift=0, train_max_rotation_deg=15), digits, "train", 200)
    scaled = take(DataConfig(dataset="mnist", max_shift=0, train_max_scale_change=0.2), digits, "train", 200)
    np.testing.assert_array_equal(plain["label"], turned["label"])
    turn = np.array([orientation_deg(b) - orientation_deg(a)
                     for a, b in zip(plain["image"][..., 0], turned["image"][..., 0])])
    turn = (turn + 90) % 180 - 90  # an axis, not a direction: 179 degrees is -1
    assert np.all(np.abs(turn) < 15 + 2) and turn.max() - turn.min() > 25  # the whole range is used
    area = scaled["image"].sum(axis=(1, 2, 3)) / plain["image"].sum(axis=(1, 2, 3))  # ~ scale^2
    assert area.min() > 0.8 ** 2 - 0.05 and area.max() < 1.2 ** 2 + 0.05 and area.max() - area.min() > 0.5
    test = take(DataConfig(dataset="mnist", train_max_rotation_deg=15), digits, "test", 20)
    assert all(len(source_index(digits, image)) for image in test["image"][..., 0])  # test digits as they are


def test_training_rotation_turns_each_digit_about_its_own_position(train_digits):
    # The same seed draws the same digits, angles and scales; only the shifts differ.
    turn = dict(dataset="expanded-mnist", train_max_rotation_deg=15, train_max_scale_change=0.1)
    centred = take(DataConfig(max_shift=0, **turn), train_digits, "train", 50)["image"][..., 0]
    shifted = take(DataConfig(max_shift=6, **turn), train_digits, "train", 50)["image"][..., 0]
    shifts = [(dy, dx) for dy in range(-6, 7) for dx in range(-6, 7)]
    for a, b in zip(centred, shifted):
        assert any(np.allclose(np.roll(a, shift, axis=(0, 1)), b, atol=1e-5) for shift in shifts)
    assert not np.allclose(centred, shifted)


def test_rotation_and_scaling_stop_after_their_epochs(train_digits):
    digits = Examples(train_digits.images[:10], train_digits.labels[:10])  # 10-example epochs
    early = DataConfig(dataset="mnist", max_shift=0, train_max_rotation_deg=15, train_max_scale_change=0.1,
                       train_rotate_scale_epochs=2)
    turned = take(early, digits, "train", 6, start_example=17)["image"]  # positions 17-22: epochs 1 and 2
    plain = take(DataConfig(dataset="mnist", max_shift=0), digits, "train", 6, start_example=17)["image"]
    same = [np.allclose(a, b, atol=1e-5) for a, b in zip(turned, plain)]
    assert same == [False] * 3 + [True] * 3


def test_drawn_affine_parameters_stay_in_their_ranges():
    from capstf.data.datasets import _draw_affine
    cfg = DataConfig(dataset="affnist", max_rotation_deg=20, max_shear=0.2, min_scale=0.8, max_scale=1.2)
    seed = tf.constant(3, tf.int64)
    draws = [_draw_affine(tf.constant(0), tf.constant(k, tf.int64), seed, None, cfg, False) for k in range(300)]
    values = {key: np.array([float(d[key]) for d in draws]) for key in ("angle", "shear", "scale_x", "scale_y", "tx")}
    for key, (low, high) in {"angle": (-20, 20), "shear": (-0.2, 0.2), "scale_x": (0.8, 1.2),
                             "scale_y": (0.8, 1.2), "tx": (0, 1)}.items():
        assert values[key].min() >= low and values[key].max() <= high
        assert values[key].max() - values[key].min() > 0.8 * (high - low)  # the whole range is used


def test_every_data_set_in_the_catalog_is_drawn_and_has_its_recipe():
    from capstf import config
    from capstf.catalog import DATA_SETS, data_set
    from capstf.data.datasets import DRAWINGS
    assert {d.examples for d in DATA_SETS.values()} | {data_set("tfds:mnist").examples} == set(DRAWINGS)
    for d in DATA_SETS.values():
        cfg = config.resolve(d.recipe, {"data.dataset": d.name})
        assert (cfg.model.input_size, cfg.model.digits_per_image, cfg.model.channels, cfg.model.num_classes) == d.canvas


def test_offline_tfds_fails_fast_naming_the_ways_out(monkeypatch, tmp_path):
    import socket
    import time

    def unreachable(*args, **kwargs):
        raise OSError("network is unreachable")
    monkeypatch.setattr(socket, "create_connection", unreachable)
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))  # no prepared copy there
    start = time.perf_counter()
    with pytest.raises(CapstfError, match="--data-dir sample") as error:
        load_examples("", "train")
    assert "storage.googleapis.com" in str(error.value) and time.perf_counter() - start < 5


@pytest.mark.parametrize("start", [0, 40])  # 40: resumed mid-stream
def test_input_pipelines_together_yield_exactly_the_one_pipeline_stream(train_digits, start):
    cfg = DataConfig(dataset="multimnist", max_shift=4)
    one = take(cfg, train_digits, "train", 24, start_example=start)["image"]
    pipelines = [take(cfg, train_digits, "train", 8, start_example=start, pipeline_id=p, num_pipelines=3)["image"]
                 for p in range(3)]
    together = np.stack(pipelines, axis=1).reshape(one.shape)  # example i comes from pipeline i % 3
    np.testing.assert_array_equal(together, one)


def test_multimnist_refuses_digits_without_every_class(train_digits):
    no_nines = train_digits.labels != 9
    digits = Examples(train_digits.images[no_nines], train_digits.labels[no_nines])
    with pytest.raises(CapstfError, match="the train digits hold no 9"):
        make_dataset(DataConfig(dataset="multimnist", max_shift=4), digits, "train", 8, seed=0)


def test_capstf_data_writes_the_examples_it_names_and_their_contact_sheet(tmp_path, test_digits):
    from PIL import Image
    out, png = tmp_path / "digits.dat", tmp_path / "digits.png"  # not .npz: the file is still `out`
    result = CliRunner().invoke(main, ["data", "--dataset", "mnist", "--data-dir", "sample", "--split", "test",
                                       "--count", "8", "--out", str(out), "--png", str(png)])
    assert result.exit_code == 0, result.output
    saved = np.load(out)
    assert saved["images"].shape == (8, 28, 28, 1) and saved["labels"].shape == (8,)
    for image, label in zip(saved["images"][..., 0], saved["labels"]):  # each a test digit, its own label
        matches = source_index(test_digits, image)
        assert len(matches) and test_digits.labels[matches[0]] == label
    assert Image.open(png).size == (2 + 8 * (28 + 2), 2 + 28 + 2)  # one row of 8 tiles, 2-pixel gaps
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits.dat", "digits.png"]


def test_a_failed_write_is_one_line_and_leaves_the_old_file_whole(tmp_path, monkeypatch):
    from PIL import Image
    png = tmp_path / "sheet.png"
    png.write_bytes(b"the sheet of an earlier run")

    def write_half_then_fail(image, fp, format=None, **kwargs):
        open(fp, "wb").write(b"\x89PNG half")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(Image.Image, "save", write_half_then_fail)
    result = CliRunner().invoke(main, ["data", "--dataset", "mnist", "--data-dir", "sample", "--count", "4",
                                       "--out", str(tmp_path / "digits.npz"), "--png", str(png)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.startswith("capstf: error: Cannot write") and "No space left on device" in result.output
    assert png.read_bytes() == b"the sheet of an earlier run"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits.npz", "sheet.png"]  # no scratch file
