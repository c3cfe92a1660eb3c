"""The paper's other data sets (smallNORB, CIFAR10, SVHN) and any TFDS image set, offline:
TFDS's mock_data makes random examples that follow each data set's real features."""
import json

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from click.testing import CliRunner
from PIL import Image
from conftest import differences_in_exported_files, model_from_checkpoint_files

from capstf import config as config_lib
from capstf.catalog import data_set
from capstf.cli import main
from capstf.data.datasets import make_dataset
from capstf.data.inspect import viewable
from capstf.data.sources import Examples, load_examples
from capstf.errors import CapstfError, RuntimeFailure
from capstf.evaluate import measure
from capstf.export import export
from capstf.serving import client
from capstf.serving.server import start_server
from capstf.train import train
from capstf.sheets import SCALE, reconstruction_sheet

MOCK_EXAMPLES = 24
# data set -> (source images as loaded [H, W, C], classes, the crop the model sees)
SOURCES = {"smallnorb": ((48, 48, 2), 5, 32), "cifar10": ((32, 32, 3), 10, 24), "svhn": ((32, 32, 3), 10, 32),
           "tfds:fashion_mnist": ((28, 28, 1), 10, 28)}


@pytest.fixture
def mock_tfds():
    with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
        yield


def data_config(dataset, **settings):
    cfg = config_lib.resolve(data_set(dataset).recipe, {"data.dataset": dataset, **settings})
    return cfg.data


def one_batch(data_cfg, examples, split, count, seed=0):
    return next(iter(make_dataset(data_cfg, examples, split, count, seed, limit=count)))


def crops_of(source, size):
    """{offset (top, left): crop} of one [H, W, C] uint8 image, as floats in [0, 1]."""
    room = source.shape[0] - size
    return {(t, l): source[t:t + size, l:l + size] / 255.0 for t in range(room + 1) for l in range(room + 1)}


@pytest.mark.parametrize("dataset", SOURCES)
def test_tfds_sets_load_with_their_shape_channels_and_classes(mock_tfds, dataset):
    shape, classes, _ = SOURCES[dataset]
    examples = load_examples("", "train", dataset)
    assert examples.images.shape == (MOCK_EXAMPLES, *shape) and examples.images.dtype == np.uint8
    assert examples.num_classes == classes
    assert examples.labels.min() >= 0 and examples.labels.max() < classes


@pytest.mark.parametrize("dataset", ["smallnorb", "cifar10"])
def test_training_takes_random_crops_and_testing_the_central_crop(mock_tfds, dataset):
    _, _, size = SOURCES[dataset]
    examples = load_examples("", "train", dataset)
    plain = data_config(dataset, **{"data.random_flip": False, "data.max_brightness_delta": 0.0,
                                    "data.max_contrast_change": 0.0})
    test = one_batch(plain, examples, "test", MOCK_EXAMPLES)
    room = examples.images.shape[1] - size
    centre = examples.images[:, room // 2:room // 2 + size, room // 2:room // 2 + size] / 255.0
    np.testing.assert_allclose(test["image"].numpy(), centre, atol=1e-6)
    np.testing.assert_array_equal(test["label"].numpy(), examples.labels)

    train_batch = one_batch(plain, examples, "train", 32)
    assert train_batch["image"].shape == (32, size, size, examples.images.shape[3])
    offsets = set()
    for image, label in zip(train_batch["image"].numpy(), train_batch["label"].numpy()):
        found = [(offset, i) for i in np.flatnonzero(examples.labels == label)
                 for offset, crop in crops_of(examples.images[i], size).items() if np.allclose(crop, image, atol=1e-6)]
        assert found, "a training image that is no crop of any source image of its class"
        offsets.add(found[0][0])
    assert len(offsets) > 8  # crops at many places, not one


def jitter_examples():
    """16 random mid-range colour images: the jitters below never reach 0 or 1, so never clip."""
    images = np.random.default_rng(0).integers(64, 192, [16, 32, 32, 3], np.uint8)
    crops = [crop for source in images for crop in crops_of(source, 24).values()]
    return Examples(images, np.arange(16, dtype=np.int32) % 10), crops


def cifar_training_images(count, **settings):
    examples, crops = jitter_examples()
    cfg = data_config("cifar10", **{"data.random_flip": False, "data.max_brightness_delta": 0.0,
                                    "data.max_contrast_change": 0.0, **settings})
    return one_batch(cfg, examples, "train", count)["image"].numpy(), crops


def test_flips_mirror_about_half_the_crops():
    images, crops = cifar_training_images(64, **{"data.random_flip": True})
    mirrored = 0
    for image in images:
        as_is = any(np.allclose(c, image, atol=1e-6) for c in crops)
        flipped = any(np.allclose(c[:, ::-1], image, atol=1e-6) for c in crops)
        assert as_is or flipped
        mirrored += flipped and not as_is
    assert 16 <= mirrored <= 48


def test_brightness_jitter_adds_one_offset_per_image_within_its_bound():
    images, crops = cifar_training_images(64, **{"data.max_brightness_delta": 0.1})
    offsets = []
    for image in images:
        matches = [float(np.mean(image - c)) for c in crops if np.ptp(image - c) < 1e-5]
        assert matches and abs(matches[0]) <= 0.1 + 1e-6
        offsets.append(matches[0])
    assert np.std(offsets) > 0.02  # drawn per image


def test_contrast_jitter_scales_each_channel_about_its_mean_within_its_bound():
    images, crops = cifar_training_images(32, **{"data.max_contrast_change": 0.5})
    factors = []
    for image in images:
        for crop in crops:
            mean = crop.mean((0, 1))
            factor = np.sum((image - mean) * (crop - mean)) / np.sum((crop - mean) ** 2)  # least squares
            if np.allclose(image, (crop - mean) * factor + mean, atol=1e-5):
                factors.append(factor)
                break
        else:
            pytest.fail("a contrast-jittered image that is no scaled crop")
    assert min(factors) >= 0.5 - 1e-6 and max(factors) <= 1.5 + 1e-6 and np.std(factors) > 0.1


def test_streams_are_deterministic_for_a_seed(mock_tfds):
    examples = load_examples("", "train", "cifar10")
    cfg = data_config("cifar10")
    a, b, c = (one_batch(cfg, examples, "train", 16, seed) for seed in (0, 0, 1))
    np.testing.assert_array_equal(a["image"].numpy(), b["image"].numpy())
    assert not np.array_equal(a["image"].numpy(), c["image"].numpy())


def test_augmentation_settings_are_refused_for_digit_data_sets():
    with pytest.raises(CapstfError, match="random_flip"):
        config_lib.resolve("mnist", {"data.random_flip": True})


def test_a_tfds_name_tfds_does_not_know_and_one_without_an_image_or_label_are_clear_errors(mock_tfds):
    with pytest.raises(CapstfError, match="no data set 'no_such_data_set'"):
        load_examples("", "train", "tfds:no_such_data_set")
    with pytest.raises(CapstfError, match="one image and one class label"):
        load_examples("", "train", "tfds:imdb_reviews")
    with pytest.raises(CapstfError, match="MNIST digits only"):
        load_examples("sample", "train", "cifar10")


def test_an_unprepared_tfds_set_offline_fails_at_once_with_what_to_do(tmp_path):
    with pytest.raises(RuntimeFailure, match="tfds build cifar10"):
        load_examples(str(tmp_path), "train", "cifar10")


def test_the_cli_names_an_unknown_dataset_in_one_line():
    result = CliRunner().invoke(main, ["train", "--dataset", "cifar", "--runlocal"])
    assert result.exit_code == 2 and "tfds:NAME" in result.output


def test_colour_and_stereo_images_are_drawn_as_they_are():
    red = np.zeros([4, 4, 3], np.float32)
    red[..., 0] = 1.0
    np.testing.assert_array_equal(viewable(red)[0, 0], [255, 0, 0])
    stereo = np.stack([np.zeros([4, 4]), np.ones([4, 4])], -1)
    assert viewable(stereo).shape == (4, 8, 3)
    np.testing.assert_array_equal(viewable(stereo)[0, :, 0], [0] * 4 + [255] * 4)  # left view, right view
    sheet = np.asarray(reconstruction_sheet(red[None], red[None, None] * 0.5, np.array([[1]]), np.array([[1]])))
    np.testing.assert_array_equal(sheet[2 + SCALE, 2 + SCALE], [255, 0, 0])           # the input, in colour
    np.testing.assert_array_equal(sheet[2 + 5 * SCALE, 2 + SCALE], [128, 0, 0])       # its reconstruction below


def test_a_colour_png_reaches_the_server_with_its_three_channels(tmp_path):
    pixels = np.zeros([24, 24, 3], np.uint8)
    pixels[..., 2] = 255
    Image.fromarray(pixels, "RGB").save(tmp_path / "blue.png")
    Image.fromarray(pixels[..., 2], "L").save(tmp_path / "grey.png")
    images, _ = client.read_images([tmp_path / "blue.png"])
    assert images.shape == (1, 24, 24, 3) and images[0, 0, 0].tolist() == [0, 0, 1]
    assert client.read_images([tmp_path / "grey.png"])[0].shape == (1, 24, 24, 1)
    with pytest.raises(CapstfError, match="different shapes"):
        client.read_images([tmp_path / "blue.png", tmp_path / "grey.png"])


def small(dataset, **overrides):
    return config_lib.resolve(data_set(dataset).recipe, {
        "data.dataset": dataset, "train.precision": "float32", "train.distribute": "one-device",
        "train.eval_examples": 0, **overrides}, runlocal=True)


@pytest.mark.parametrize("dataset", ["smallnorb", "cifar10", "svhn", "tfds:fashion_mnist"])
def test_each_set_trains_evaluates_and_exports_with_matching_onnx(mock_tfds, tmp_path, dataset):
    shape, classes, size = SOURCES[dataset]
    model_dir = tmp_path / "model"
    result = train(small(dataset, **{"train.steps": 4, "train.checkpoint_every": 4}), model_dir, quiet=True)
    assert result["step"] == 4 and (model_dir / "checkpoints" / "ckpt-4.index").is_file()
    saved = config_lib.load_saved(model_dir)
    assert (saved.model.input_size, saved.model.channels, saved.model.num_classes) == (size, shape[2], classes)
    examples = load_examples("", "test", dataset)
    model = model_from_checkpoint_files(model_dir, 4)
    test_images = one_batch(saved.data, examples, "test", MOCK_EXAMPLES)["image"].numpy()
    predicted = np.argmax(model(test_images)["probabilities"].numpy(), axis=1)
    metrics = measure(model_dir)
    assert metrics["examples"] == MOCK_EXAMPLES and metrics["accuracy"] == pytest.approx(np.mean(predicted == examples.labels))
    report = export(model_dir, tmp_path / "out", verify_examples=8)
    images = test_images[:8]  # what export verifies on
    recomputed = differences_in_exported_files(tmp_path / "out", images, model(images)["probabilities"].numpy())
    assert report["verified_on"] == f"8 real {dataset} test examples" and set(recomputed) == {"savedmodel", "onnx"}
    for fmt, difference in recomputed.items():
        assert report[fmt]["max_abs_difference"]["probabilities"] == pytest.approx(difference, abs=1e-6)
    served = tf.saved_model.load(str(tmp_path / "out" / "capsnet" / "1")).signatures["serving_default"]
    assert served.structured_input_signature[1]["images"].shape.as_list() == [None, size, size, shape[2]]
    assert served.structured_outputs["probabilities"].shape.as_list() == [None, classes]
    images = test_images[:4]
    expected = model(images)["probabilities"].numpy()
    server, port, _ = start_server(tmp_path / "out", port=0)
    try:
        answer = client.predict_grpc(f"127.0.0.1:{port}", "capsnet", "serving_default", images)
    finally:
        server.stop(0)
    np.testing.assert_allclose(answer["probabilities"], expected, atol=1e-5)


def test_a_cifar10_ensemble_averages_its_members_capsule_lengths(mock_tfds, tmp_path):
    for seed in (0, 1):
        train(small("cifar10", **{"train.steps": 3, "train.seed": seed}), tmp_path / str(seed), quiet=True)
    examples = load_examples("", "test", "cifar10")
    images = one_batch(data_config("cifar10"), examples, "test", MOCK_EXAMPLES)["image"]
    lengths = [model_from_checkpoint_files(tmp_path / str(s), 3)(images)["probabilities"].numpy() for s in (0, 1)]
    assert not np.allclose(lengths[0], lengths[1])
    expected = np.mean(np.argmax(lengths[0] + lengths[1], axis=1) == examples.labels)
    result = CliRunner().invoke(main, ["evaluate", "--model-dir", str(tmp_path / "0"), "--model-dir", str(tmp_path / "1")])
    assert json.loads(result.output)["accuracy"] == pytest.approx(expected)
