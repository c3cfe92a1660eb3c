"""`capstf export`: a SavedModel in TF Serving's layout and an ONNX model, both verified.

OUT/<name>/<version>/      SavedModel; signatures `serving_default` (float32 images in [0, 1])
                           and `predict_uint8` (uint8 images 0..255); and
                           assets.extra/tf_serving_warmup_requests, a request to each signature
                           that TF Serving (and `capstf serve`) replays before serving a version
OUT/<name>.onnx            the same math through tf2onnx, checked in onnxruntime
OUT/<name>.export_report.json   what was checked, and the largest differences found
Everything is written under a temporary name and renamed only once verified.
"""
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import tensorflow as tf

from capstf import config as config_lib
from capstf.checkpoints import restore_for_inference
from capstf.data.datasets import make_dataset
from capstf.data.sources import load_examples
from capstf.errors import CapstfError, RuntimeFailure
from capstf.files import write_json

ONNX_OPSET = 17
TOLERANCE = 1e-4


class ServingModule(tf.Module):
    """The trained model behind serving signatures, with input checks inside the graph.

    TF Serving runs the graph alone, so shape, dtype and value checks must live in it: a bad
    request fails with INVALID_ARGUMENT there too.
    """

    def __init__(self, model, cfg):
        super().__init__()
        self.model, self.cfg = model, cfg
        shape = [None, cfg.model.input_size, cfg.model.input_size, cfg.model.channels]
        self.serving_default = tf.function(self._predict_float, input_signature=[tf.TensorSpec(shape, tf.float32, "images")])
        self.predict_uint8 = tf.function(self._predict_uint8, input_signature=[tf.TensorSpec(shape, tf.uint8, "images")])
        self.outputs = tf.function(self._outputs, input_signature=[tf.TensorSpec(shape, tf.float32, "images")])

    def _outputs(self, images):
        out = self.model(images, training=False)
        k = self.cfg.model.digits_per_image
        result = {"probabilities": out["probabilities"], "capsules": out.get("capsules", out["probabilities"][..., None]),
                  "classes": tf.math.top_k(out["probabilities"], k).indices}
        if "reconstructions" in out:
            result["reconstructions"] = out["reconstructions"]
        return result

    def _predict_float(self, images):
        checks = [tf.debugging.assert_positive(tf.shape(images)[0], message="empty batch"),
                  tf.debugging.assert_all_finite(images, "images must be finite (no NaN or Inf)"),
                  tf.debugging.assert_greater_equal(images, 0.0, message="images must be in [0, 1]"),
                  tf.debugging.assert_less_equal(images, 1.0, message="images must be in [0, 1]")]
        with tf.control_dependencies(checks):
            return self._outputs(tf.identity(images))

    def _predict_uint8(self, images):
        with tf.control_dependencies([tf.debugging.assert_positive(tf.shape(images)[0], message="empty batch")]):
            return self._outputs(tf.cast(images, tf.float32) / 255.0)


def next_version(base: Path) -> int:
    versions = [int(p.name) for p in base.iterdir() if p.name.isdigit()] if base.is_dir() else []
    return max(versions, default=0) + 1


def export(model_dir, export_dir, name="capsnet", version=None, formats=("savedmodel", "onnx"),
           xla=False, verify_examples=64, data_dir=None) -> dict:
    """Exports the newest checkpoint of model_dir; returns the export report.

    data_dir: where the test examples that verify the exports come from (default: the training
    data's source; `sample`, the bundled digits, needs neither network nor files).
    """
    model_dir, export_dir = Path(model_dir), Path(export_dir)
    unknown = set(formats) - {"savedmodel", "onnx"}
    if unknown or not formats:
        raise CapstfError(f"--format takes savedmodel and/or onnx, not {','.join(sorted(unknown)) or 'nothing'}.")
    cfg = config_lib.load_saved(model_dir)
    model, step = restore_for_inference(model_dir, cfg)
    if xla and hasattr(model, "jit_routing"):  # only on request: TF Serving needs XLA enabled for it
        model.jit_routing = True
    module = ServingModule(model, cfg)
    base = export_dir / name
    version = version or next_version(base)
    target = base / str(version)
    if target.exists():
        raise CapstfError(f"{target} already exists; choose another --version (next free: {next_version(base)}).")
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RuntimeFailure(f"Cannot write to --export-dir {export_dir}: {e.strerror}.") from None

    if data_dir is not None:
        cfg = cfg.with_settings({"data.data_dir": data_dir})
    examples = load_examples(cfg.data.data_dir, "test", cfg.data.dataset)
    batch = next(iter(make_dataset(cfg.data, examples, "test", verify_examples, cfg.train.seed, limit=verify_examples)))
    images = batch["image"]
    reference = {k: v.numpy() for k, v in module.outputs(images).items()}
    report = {"model_dir": str(model_dir), "step": step, "dataset": cfg.data.dataset,
              "verified_on": f"{len(images)} real {cfg.data.dataset} test examples", "tolerance": TOLERANCE}

    # Both formats are written and verified under scratch names, then published together, the
    # SavedModel last: a server loads a version as soon as its folder appears.
    scratch_folder = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=base))
    scratch_onnx = export_dir / f".{name}.onnx.tmp"
    try:
        if "savedmodel" in formats:
            report["savedmodel"] = _write_savedmodel(module, scratch_folder, images, reference, xla)
        if "onnx" in formats:
            report["onnx"] = _write_onnx(module, scratch_onnx, images, reference)
            os.replace(scratch_onnx, export_dir / f"{name}.onnx")
            report["onnx"]["path"] = str(export_dir / f"{name}.onnx")
        if "savedmodel" in formats:
            os.rename(scratch_folder, target)
            report["savedmodel"]["path"] = str(target)
    finally:
        shutil.rmtree(scratch_folder, ignore_errors=True)
        if scratch_onnx.exists():
            scratch_onnx.unlink()
    write_json(export_dir / f"{name}.export_report.json", report)
    return report


def _max_differences(expected: dict, actual: dict) -> dict:
    diffs = {}
    for key, value in expected.items():
        got = np.asarray(actual[key])
        diffs[key] = float(np.max(np.abs(got.astype(np.float64) - value))) if got.shape == value.shape else float("inf")
    return diffs


def _check(diffs: dict, what: str):
    bad = {k: v for k, v in diffs.items() if not v <= TOLERANCE}
    if bad:
        raise RuntimeFailure(f"{what} disagrees with the trained model beyond {TOLERANCE}: {bad}; nothing was exported.")


def _write_savedmodel(module, folder, images, reference, xla):
    """Saves the SavedModel into `folder` and checks both its signatures against `reference`."""
    tf.saved_model.save(module, str(folder), signatures={
        "serving_default": module.serving_default, "predict_uint8": module.predict_uint8})
    loaded = tf.saved_model.load(str(folder))
    diffs = _max_differences(reference, loaded.signatures["serving_default"](images=images))
    _check(diffs, "The SavedModel")
    # predict_uint8 against the model on the same bytes (the test images need not be whole bytes).
    image_bytes = tf.cast(tf.round(images * 255.0), tf.uint8)
    uint8_reference = {k: v.numpy() for k, v in module.outputs(tf.cast(image_bytes, tf.float32) / 255.0).items()}
    uint8_diffs = _max_differences(uint8_reference, loaded.signatures["predict_uint8"](images=image_bytes))
    _check(uint8_diffs, "The SavedModel's predict_uint8")
    if not xla and b"_XlaMustCompile" in b"".join(p.read_bytes() for p in folder.rglob("*.pb")):
        raise RuntimeFailure("The SavedModel holds XLA must-compile attributes; TF Serving and tf2onnx cannot run them.")
    write_warmup_requests(folder, {"serving_default": images[:1], "predict_uint8": image_bytes[:1]})
    return {"signatures": ["serving_default", "predict_uint8"], "max_abs_difference": diffs,
            "predict_uint8_max_abs_difference": uint8_diffs}


def write_warmup_requests(folder, inputs_by_signature):
    """TF Serving's warm-up file: one PredictionLog per signature, its `images` input given. A
    server replays them as it loads the version, so the first real request does not pay for the
    first run of every kernel."""
    from tensorflow_serving.apis import predict_pb2, prediction_log_pb2
    (folder / "assets.extra").mkdir()
    with tf.io.TFRecordWriter(str(folder / "assets.extra" / "tf_serving_warmup_requests")) as records:
        for signature, images in inputs_by_signature.items():
            request = predict_pb2.PredictRequest()
            request.model_spec.signature_name = signature
            request.inputs["images"].CopyFrom(tf.make_tensor_proto(np.asarray(images)))
            records.write(prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request)).SerializeToString())


def _write_onnx(module, path, images, reference):
    """Converts the model to ONNX at `path` and checks it in onnxruntime against `reference`."""
    import onnxruntime
    import tf2onnx
    concrete = module.outputs.get_concrete_function()
    try:
        tf2onnx.convert.from_function(module.outputs, input_signature=concrete.structured_input_signature[0],
                                      opset=ONNX_OPSET, output_path=str(path))
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        got = dict(zip(names, session.run(None, {session.get_inputs()[0].name: images.numpy()})))
    except Exception as e:  # tf2onnx and onnxruntime raise many types
        raise RuntimeFailure(f"ONNX conversion failed ({type(e).__name__}: {e}); nothing was exported.") from None
    diffs = _max_differences(reference, got)
    _check(diffs, "The ONNX model")
    return {"opset": ONNX_OPSET, "max_abs_difference": diffs}
