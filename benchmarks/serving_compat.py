"""Does a SavedModel exported by capstf (TensorFlow 2.21) run in the TensorFlow that the pinned
TF Serving image is built on? Prints JSON.

    python benchmarks/serving_compat.py --export-dir exports [--name capsnet] [--tensorflow 2.20.0]

TensorFlow only promises that a SavedModel loads in a runtime at least as new as the one that
wrote it, and TF Serving trails TensorFlow's releases (serving/compose.yaml pins the newest).
This installs that TensorFlow into a throwaway venv, loads the export there without capstf,
runs both signatures (`serving_default` on float images, `predict_uint8` on the same images as
uint8) on real test digits, and compares every output with capstf's own model in this process.
Offline (no package index), it says so and skips.
"""
import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-4
RUN_THERE = r"""
import json, sys
import numpy as np
import tensorflow as tf
path, inputs, outputs = sys.argv[1:4]
images = np.load(inputs)
loaded = tf.saved_model.load(path)
results = {"tensorflow": tf.__version__}
for name, batch in (("serving_default", tf.constant(images / 255.0, tf.float32)),
                    ("predict_uint8", tf.constant(images, tf.uint8))):
    out = loaded.signatures[name](images=batch)
    results[name] = {k: v.numpy() for k, v in out.items()}
np.savez(outputs, **{f"{s}.{k}": v for s in ("serving_default", "predict_uint8") for k, v in results[s].items()})
print(json.dumps({"tensorflow": results["tensorflow"]}))
"""


def serving_tensorflow_version():
    """The TensorFlow release the compose file's TF Serving image is built on (same number)."""
    text = (ROOT / "serving" / "compose.yaml").read_text()
    return re.search(r"tensorflow/serving:(\d+\.\d+\.\d+)", text).group(1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--export-dir", required=True)
    parser.add_argument("--name", default="capsnet")
    parser.add_argument("--tensorflow", default=None, help="Default: the version of serving/compose.yaml's image.")
    parser.add_argument("--count", type=int, default=64, help="Test digits to compare on.")
    args = parser.parse_args()
    version = args.tensorflow or serving_tensorflow_version()
    versions = sorted(Path(args.export_dir, args.name).iterdir(), key=lambda p: int(p.name) if p.name.isdigit() else -1)
    savedmodel = versions[-1]

    import tensorflow as tf
    from capstf.data.sources import load_examples
    images = load_examples("sample", "test").images[:args.count, ..., None]  # uint8 [n, 28, 28, 1]
    ours = tf.saved_model.load(str(savedmodel)).signatures["serving_default"](images=tf.constant(images / 255.0, tf.float32))

    with tempfile.TemporaryDirectory() as tmp:
        venv = Path(tmp) / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", f"tensorflow-cpu=={version}"],
                             capture_output=True, text=True)
        if pip.returncode:
            print(json.dumps({"skipped": f"could not install tensorflow-cpu=={version} (offline?)",
                              "pip": pip.stderr.strip().splitlines()[-1:]}))
            return
        np.save(Path(tmp) / "in.npy", images)
        run = subprocess.run([str(venv / "bin" / "python"), "-c", RUN_THERE, str(savedmodel), str(Path(tmp) / "in.npy"),
                              str(Path(tmp) / "out.npz")], capture_output=True, text=True)
        if run.returncode:
            print(json.dumps({"tensorflow": version, "loads": False, "error": run.stderr.strip().splitlines()[-1:]}))
            sys.exit(1)
        theirs = np.load(Path(tmp) / "out.npz")
        differences = {key: float(np.max(np.abs(theirs[key] - ours[key.split(".", 1)[1]].numpy())))
                       for key in theirs.files}
    report = {"savedmodel": str(savedmodel), "tensorflow": version, "loads": True, "digits": len(images),
              "max_abs_difference": differences, "same_outputs": max(differences.values()) <= TOLERANCE}
    print(json.dumps(report, indent=2))
    sys.exit(0 if report["same_outputs"] else 1)


if __name__ == "__main__":
    main()
