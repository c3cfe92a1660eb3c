"""`capstf` command line: each command parses its flags and calls one function."""
import functools
import json
import os
import sys

import click

from capstf.catalog import DATA_SETS, TFDS_PREFIX, TRAINABLE, check_dataset_name, data_set, is_tfds_name
from capstf.config import CHOICES
from capstf.errors import CapstfError, RuntimeFailure
from capstf.serving.limits import Limits

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's own log lines once its logging is set up
EXIT_CODES = """\b
Exit codes: 0 done; 2 bad usage or input (a flag, a file, a model dir: one line says which);
1 a failure of the work itself (a server out of reach, a full disk, a failed export check);
143 training stopped on SIGTERM, its last step checkpointed (rerun to resume); 130 Ctrl-C."""
TRAIN_FLAGS = {  # flag -> the setting it overrides
    "epochs": "train.epochs", "steps": "train.steps", "batch_size": "train.batch_size",
    "learning_rate": "train.learning_rate", "routing_iters": "model.routing_iters", "seed": "train.seed",
    "jit": "train.jit", "precision": "train.precision", "distribute": "train.distribute",
    "checkpoint_every": "train.checkpoint_every", "eval_examples": "train.eval_examples",
    "steps_per_call": "train.steps_per_call", "data_service": "train.data_service",
    "data_dir": "data.data_dir"}


def start_tensorflow_quietly():
    """Loads TensorFlow and probes its devices with stderr silenced: its C++ start-up lines
    (absl's InitializeLog warning, the oneDNN notice, the CUDA probe's errors on machines
    without a GPU) are written before any log setting applies. `capstf --verbose` shows them."""
    if os.environ.get("CAPSTF_VERBOSE") or "tensorflow" in sys.modules:
        return
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        import tensorflow as tf
        tf.config.list_physical_devices("GPU")
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def clear_errors(command):
    """Turns expected failures into one clear line on stderr and a non-zero exit."""
    @functools.wraps(command)
    def run(*args, **kwargs):
        try:
            start_tensorflow_quietly()
            return command(*args, **kwargs)
        except CapstfError as e:
            click.echo(f"capstf: error: {e}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("capstf: interrupted; checkpoints written so far are kept.", err=True)
            sys.exit(130)
    return run


class DatasetName(click.ParamType):
    """One of `choices`, or tfds:NAME[:CONFIG] (any TFDS image classification set)."""
    name = "dataset"

    def __init__(self, choices):
        self.choices = tuple(choices)

    def get_metavar(self, *args, **kwargs):
        return f"[{'|'.join(self.choices)}|{TFDS_PREFIX}NAME]"

    def convert(self, value, param, ctx):
        try:
            check_dataset_name(value, self.choices)
        except CapstfError as e:
            self.fail(str(e), param, ctx)
        return value


def data_dir_option(f):
    return click.option("--data-dir", default=None, metavar="DIR|sample",
                        help="Folder of MNIST IDX files, 'sample' for the bundled digits, or a prepared "
                             "TFDS data dir (default: TFDS's own, or the model's data dir).")(f)


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_CODES)
@click.version_option(package_name="capstf", prog_name="capstf")
@click.option("--verbose", is_flag=True, help="Show TensorFlow's own start-up and log lines.")
def main(verbose):
    """capstf: CapsNets (Sabour et al. 2017) on TensorFlow 2: train, evaluate, export, serve.

    \b
    Example: capstf train --dataset mnist --data-dir sample --runlocal
    """
    if verbose:
        os.environ["CAPSTF_VERBOSE"] = "1"
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"


@main.command()
@click.option("--dataset", type=DatasetName(TRAINABLE), required=True, help="The experiment; picks its recipe.")
@click.option("--recipe", default=None, help="Recipe name in pipelines/ or a .toml path (default: the data set's).")
@data_dir_option
@click.option("--model-dir", default=None, help="Checkpoints, TensorBoard logs, config (default runs/<dataset>).")
@click.option("--epochs", type=float, help="Passes over the training digits.")
@click.option("--steps", type=int, help="Optimizer steps (overrides --epochs).")
@click.option("--batch-size", type=int, help="Global batch size, over all replicas.")
@click.option("--learning-rate", type=float)
@click.option("--routing-iters", type=int)
@click.option("--seed", type=int)
@click.option("--jit", type=click.Choice(CHOICES["train.jit"]),
              help="What XLA compiles: routing (the capsule layers after the convolutions), step, off.")
@click.option("--precision", type=click.Choice(CHOICES["train.precision"]))
@click.option("--distribute", type=click.Choice(CHOICES["train.distribute"]))
@click.option("--checkpoint-every", type=int, help="Steps between checkpoints.")
@click.option("--steps-per-call", type=int, help="Training steps per compiled call (0: the device's "
              "default, 1 on a CPU): fewer host dispatches on a GPU. Checkpoints, logs and evaluations "
              "still come at their steps; SIGTERM takes effect at the end of a call.")
@click.option("--eval-examples", type=int, help="Test examples scored after each epoch (0: none).")
@click.option("--data-service", metavar="grpc://HOST:PORT",
              help="Generate the examples on tf.data service workers (`capstf data-service`), each once.")
@click.option("--no-decoder", is_flag=True, help="Train without the reconstruction decoder.")
@click.option("--runlocal", is_flag=True, help="Apply the recipe's [runlocal] settings: a quick small run.")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE", help="Any setting, e.g. --set train.decay_rate=0.9.")
@click.option("--cpu-devices", type=int, default=0, help="Split the CPU into N logical devices (for --distribute mirrored tests).")
@clear_errors
def train(dataset, recipe, model_dir, runlocal, settings, cpu_devices, no_decoder, **flags):
    """Train a model (resumes from the newest checkpoint in --model-dir).

    \b
    Example: capstf train --dataset mnist --recipe mnist-cosine --data-dir DIR
    """
    from capstf import config as config_lib
    overrides = {TRAIN_FLAGS[k]: v for k, v in flags.items() if v is not None}
    if flags["steps"] is None and flags["epochs"] is not None:
        overrides["train.steps"] = 0  # --epochs wins over a recipe's step count
    if no_decoder:
        overrides["model.decoder"] = False
    if is_tfds_name(dataset):  # the recipe's settings (default: recipe tfds) on this TFDS data set
        overrides["data.dataset"] = dataset
    overrides.update(parse_settings(settings))
    cfg = config_lib.resolve(recipe or data_set(dataset).recipe, overrides, runlocal=runlocal)
    if cfg.data.dataset != dataset:
        raise CapstfError(f"Recipe {cfg.recipe} is for {cfg.data.dataset}, not --dataset {dataset}.")
    if cpu_devices:
        from capstf.train import split_cpu
        split_cpu(cpu_devices)
    from capstf.train import train as run_training
    model_dir = model_dir or os.path.join("runs", dataset.replace(":", "-").replace("/", "-"))
    result = run_training(cfg, model_dir)
    click.echo(json.dumps(result))


def parse_settings(settings):
    """("section.key=value", ...) -> {"section.key": "value"} (config parses each by its type)."""
    overrides = {}
    for item in settings:
        key, sep, value = item.partition("=")
        if not sep:
            raise CapstfError(f"--set {item!r}: expected KEY=VALUE.")
        overrides[key] = value
    return overrides


@main.command()
@click.argument("name")
@click.option("--runs-dir", default="runs", show_default=True, help="Runs go to RUNS_DIR/NAME/<run>/.")
@data_dir_option
@click.option("--runlocal", is_flag=True, help="Shrink every run to a few steps: a smoke run.")
@click.option("--only", default="", metavar="RUN,...", help="Train and score only these runs.")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE",
              help="A setting for every run, e.g. --set train.epochs=4.")
@click.option("--trials", type=click.IntRange(min=1), default=1, show_default=True,
              help="Train each run N times, trial K with seed S+K-1 (S: its train.seed, 0 unless set) in "
                   "RUNS_DIR/NAME/<run>-trialK/ (trial 1 in <run>/), and report each figure's mean and "
                   "standard deviation; the paper's Table 1 averages 3 trials.")
@click.option("--jobs", type=click.IntRange(min=1), default=1, show_default=True,
              help="Train up to N runs (trials) at once, each in a process of its own with its output in "
                   "RUNS_DIR/NAME/logs/: for GPUs (several runs share one; with several GPUs each gets the "
                   "least used). On a CPU the runs would only share its cores.")
@click.option("--trial", "trial_numbers", default="", metavar="K,...",
              help="Train only these trials (trial K from seed S+K-1, as --trials numbers them), e.g. to "
                   "share a study's trials between machines: copy the trial dirs into one RUNS_DIR and rerun "
                   "to report them together.")
@clear_errors
def study(name, runs_dir, data_dir, runlocal, only, settings, trials, jobs, trial_numbers):
    """Run one of the paper's experiments (pipelines/studies/NAME.toml: table1, affnist), or a
    comparison on held-out training digits (mnist-settings; authors: the paper's text against the
    authors' code): train and score each of its runs, resuming unfinished ones, and write
    RUNS_DIR/NAME/results.md and results.json.

    \b
    Example: capstf study table1 --data-dir DIR --only mnist-r3,mnist-baseline
    """
    from capstf.study import results_markdown, run_study
    runs = tuple(r.strip() for r in only.split(",") if r.strip())
    numbers = [t.strip() for t in trial_numbers.split(",") if t.strip()]
    if not all(t.isdigit() for t in numbers):
        raise CapstfError(f"--trial {trial_numbers}: expected trial numbers from 1, e.g. --trial 2,3.")

    results = run_study(name, runs_dir, data_dir, runlocal, runs, parse_settings(settings),
                        log=lambda msg: click.echo(msg, err=True), trials=trials,
                        trial_numbers=[int(t) for t in numbers], jobs=jobs)
    click.echo(results_markdown(results))


@main.command()
@click.option("--root", default=".", show_default=True, type=click.Path(file_okay=False),
              help="The capstf checkout whose README.md and docs/ to regenerate.")
@click.option("--check", is_flag=True, help="Write nothing; exit 1 if a generated part or plot is out of date.")
@clear_errors
def report(root, check):
    """Regenerate the result tables and curve plots of README.md and docs/ from the run records in
    results/ (each part marked '<!-- report runs NAME: GLOB -->'); prints the files it changed.

    \b
    Example: capstf report --check
    """
    from capstf.report import write_report
    changed = write_report(root, check)
    click.echo(json.dumps({"out_of_date" if check else "changed": changed}))
    if check and changed:
        raise RuntimeFailure(f"{len(changed)} generated file(s) out of date ({', '.join(changed)}): run capstf report.")


@main.command()
@click.option("--model-dir", "model_dirs", required=True, multiple=True,
              help="A folder written by `capstf train`; several: an ensemble (capsule lengths averaged).")
@click.option("--dataset", type=DatasetName(DATA_SETS), default=None, help="Default: the one trained on.")
@data_dir_option
@click.option("--split", type=click.Choice(["train", "validation", "test"]), default="test",
              help="train: one pass over the training digits, unshifted; validation: the digits "
                   "held out by data.validation_digits.")
@click.option("--limit", type=int, default=0, help="Score at most N examples (0: all).")
@click.option("--partners", type=int, default=None, help="MultiMNIST partners per test digit.")
@clear_errors
def evaluate(model_dirs, dataset, data_dir, split, limit, partners):
    """Print (and save in the model dir) the paper's metrics as JSON.

    \b
    Example: capstf evaluate --model-dir runs/expanded-mnist --dataset affnist
    """
    from capstf.evaluate import evaluate as run_evaluation
    click.echo(json.dumps(run_evaluation(list(model_dirs), dataset, data_dir, split, limit, partners), indent=2))


@main.command()
@click.option("--dataset", type=DatasetName(DATA_SETS), required=True)
@data_dir_option
@click.option("--split", type=click.Choice(["train", "test"]), default="train")
@click.option("--count", type=int, default=64, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output .npz file.")
@click.option("--png", type=click.Path(dir_okay=False), help="Also write a contact sheet.")
@clear_errors
def data(dataset, data_dir, split, count, seed, out, png):
    """Write generated examples of a data set to .npz (and a PNG contact sheet).

    \b
    Example: capstf data --dataset multimnist --data-dir sample --count 32 --out mm.npz --png mm.png
    """
    from capstf.data.inspect import write_examples
    click.echo(json.dumps(write_examples(dataset, data_dir or "", split, count, seed, out, png)))


@main.command()
@click.option("--model-dir", required=True, help="A folder written by `capstf train`.")
@click.option("--export-dir", required=True, help="Where <name>/<version>/ and <name>.onnx go.")
@click.option("--name", default="capsnet", show_default=True, help="Model name (TF Serving's model_spec.name).")
@click.option("--version", type=click.IntRange(min=1), default=None, help="Default: the next free integer.")
@click.option("--format", "formats", default="savedmodel,onnx", show_default=True)
@click.option("--xla", is_flag=True,
              help="Keep the capsule layers (routing, decoder) XLA-compiled in the SavedModel (TF Serving then needs XLA).")
@click.option("--data-dir", default=None, metavar="DIR|sample",
              help="Test digits that verify the exports (default: the training data's source; 'sample' works offline).")
@clear_errors
def export(model_dir, export_dir, name, version, formats, xla, data_dir):
    """Export the newest checkpoint to SavedModel (TF Serving layout) and ONNX, verified.

    \b
    Example: capstf export --model-dir runs/mnist --export-dir exports
    """
    from capstf.export import export as run_export
    report = run_export(model_dir, export_dir, name, version, tuple(f.strip() for f in formats.split(",") if f.strip()),
                        xla, data_dir=data_dir)
    click.echo(json.dumps(report, indent=2))


@main.command()
@click.option("--export-dir", required=True, help="A folder written by `capstf export`.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind. 0.0.0.0 (every interface) serves anyone who can reach the machine, "
                   "unauthenticated, and in the clear unless --tls-cert and --tls-key are given.")
@click.option("--port", type=click.IntRange(0, 65535), default=8500, show_default=True)
@click.option("--tls-cert", type=click.Path(), help="PEM certificate (chain): serve over TLS only.")
@click.option("--tls-key", type=click.Path(), help="PEM private key of --tls-cert.")
@click.option("--max-concurrent-rpcs", type=click.IntRange(1), default=Limits.max_concurrent_rpcs, show_default=True,
              help="Requests in flight or queued; beyond them RESOURCE_EXHAUSTED.")
@click.option("--max-message-mb", type=click.FloatRange(0.001), default=Limits.max_message_bytes / 2**20,
              show_default=True, help="Largest request or answer, in MiB.")
@click.option("--max-images", type=click.IntRange(1), default=Limits.max_images, show_default=True,
              help="Images per request; beyond them INVALID_ARGUMENT.")
@click.option("--poll-seconds", type=click.FloatRange(0), default=1.0, show_default=True,
              help="How often to look for newer versions to load and serve (0: never).")
@click.option("--rest-port", type=click.IntRange(0, 65535), default=8501, show_default=True,
              help="TF Serving's REST API on this port, in plain HTTP (not started with --tls-cert).")
@click.option("--no-rest", is_flag=True, help="Serve gRPC only.")
@clear_errors
def serve(export_dir, host, port, tls_cert, tls_key, max_concurrent_rpcs, max_message_mb, max_images, poll_seconds,
          rest_port, no_rest):
    """Serve exported models over TF Serving's gRPC PredictionService API.

    \b
    Example: capstf serve --export-dir exports --port 8500
    """
    from capstf.serving.models import serving_line
    from capstf.serving.server import start_server
    limits = Limits(max_concurrent_rpcs, int(max_message_mb * 2**20), max_images)
    rest = None if no_rest or tls_cert else rest_port  # REST would be plain HTTP beside TLS gRPC
    server, bound, servables = start_server(export_dir, host, port, limits=limits, tls_cert=tls_cert, tls_key=tls_key,
                                            poll_seconds=poll_seconds, rest_port=rest,
                                            log=lambda message: click.echo(message) or sys.stdout.flush())
    click.echo(f"capstf: listening: gRPC on {host}:{bound}{' over TLS' if tls_cert else ''}"
               + (f", REST on {host}:{server.rest_port}" if server.rest_port else "")
               + ("" if tls_cert else ", in the clear, unauthenticated"))
    for name, servable in servables:
        click.echo(serving_line(name, servable))
    sys.stdout.flush()
    server.wait_for_termination()


@main.command()
@click.option("--server", required=True, metavar="HOST:PORT", help="TF Serving (gRPC 8500, or REST 8501 with --rest).")
@click.option("--model-name", default="capsnet", show_default=True)
@click.option("--signature", default="serving_default", show_default=True)
@click.option("--rest", is_flag=True, help="Use TF Serving's REST API instead of gRPC.")
@click.option("--metadata", is_flag=True, help="Print the model's signatures (GetModelMetadata) instead.")
@click.option("--timeout", type=float, default=10.0, show_default=True, help="Seconds to wait for an answer.")
@click.option("--tls-ca", type=click.Path(), help="PEM certificate(s) to trust: talk gRPC over TLS.")
@click.argument("files", nargs=-1, type=click.Path())
@clear_errors
def predict(server, model_name, signature, rest, metadata, timeout, tls_ca, files):
    """Classify PNG, .npy or IDX images with a served model.

    \b
    Example: capstf predict --server 127.0.0.1:8500 digit.png digits.npy
    """
    from capstf.serving import client
    if metadata:
        click.echo(json.dumps(client.metadata_grpc(server, model_name, timeout, tls_ca), indent=2))
        return
    if not files:
        raise CapstfError("Name at least one image file (PNG, .npy or IDX).")
    images, names = client.read_images(files)
    if rest and tls_ca:
        raise CapstfError("--tls-ca is for gRPC; --rest speaks plain HTTP.")
    outputs = (client.predict_rest(server, model_name, signature, images, timeout) if rest else
               client.predict_grpc(server, model_name, signature, images, timeout, tls_ca))
    for i, name in enumerate(names):
        click.echo(json.dumps({"image": name, "classes": outputs["classes"][i].tolist(),
                               "probabilities": [round(float(p), 4) for p in outputs["probabilities"][i]]}))


@main.group("data-service")
def data_service():
    """Generate training examples on other machines (tf.data service) for `capstf train --data-service`.

    \b
    Example: capstf data-service dispatcher --port 5050 &
             capstf data-service worker --dispatcher localhost:5050 --port 5051 &
             capstf train --dataset multimnist --data-service grpc://localhost:5050
    """


@data_service.command("dispatcher")
@click.option("--port", type=click.IntRange(1, 65535), default=5050, show_default=True)
@clear_errors
def data_service_dispatcher(port):
    """Start the dispatcher, which hands each trainer's examples out to the workers."""
    from capstf.data.service import start_dispatcher
    server = start_dispatcher(port)
    click.echo(f"tf.data service dispatcher on port {port}: capstf train --data-service grpc://HOST:{port}")
    sys.stdout.flush()
    server.join()


@data_service.command("worker")
@click.option("--dispatcher", required=True, metavar="HOST:PORT", help="The dispatcher's address.")
@click.option("--port", type=click.IntRange(1, 65535), default=5051, show_default=True)
@click.option("--address", metavar="HOST:PORT", default=None,
              help="Where trainers reach this worker (default: this machine's host name and --port).")
@clear_errors
def data_service_worker(dispatcher, port, address):
    """Start a worker, which generates the examples the dispatcher gives it."""
    import socket
    from capstf.data.service import start_worker
    server = start_worker(dispatcher, port, address or f"{socket.gethostname()}:{port}")
    click.echo(f"tf.data service worker on port {port}, serving dispatcher {dispatcher}")
    sys.stdout.flush()
    server.join()


@main.group()
def visualize():
    """Draw the paper's figures (reconstructions, perturbations, MultiMNIST overlays) as PNG.

    \b
    Example: capstf visualize reconstructions --model-dir runs/mnist --out recon.png
    """


def figure_options(f):
    for option in reversed([
            click.option("--model-dir", required=True, help="A folder written by `capstf train`."),
            click.option("--dataset", type=DatasetName(DATA_SETS), default=None, help="Default: the one trained on."),
            click.option("--data-dir", default=None, metavar="DIR|sample", help="Default: the model's own."),
            click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output PNG file.")]):
        f = option(f)
    return f


@visualize.command("reconstructions")
@figure_options
@click.option("--count", type=click.IntRange(1, 200), default=20, show_default=True)
@clear_errors
def visualize_reconstructions(model_dir, dataset, data_dir, out, count):
    """Inputs above their reconstructions, (label, prediction, target); misclassified first (Figure 3).

    \b
    Example: capstf visualize reconstructions --model-dir runs/mnist --count 10 --out recon.png
    """
    from capstf import visualize as figures
    click.echo(json.dumps(figures.reconstructions(model_dir, out, dataset, data_dir, count)))


@visualize.command("perturbations")
@figure_options
@click.option("--index", type=click.IntRange(0, 99), default=0, show_default=True, help="Which test example.")
@clear_errors
def visualize_perturbations(model_dir, dataset, data_dir, out, index):
    """Each capsule dimension moved from -0.25 to 0.25, decoded: one row per dimension (Figure 4).

    \b
    Example: capstf visualize perturbations --model-dir runs/mnist --out perturbations.png
    """
    from capstf import visualize as figures
    click.echo(json.dumps(figures.perturbations(model_dir, out, dataset, data_dir, index)[0]))


@visualize.command("multimnist")
@figure_options
@click.option("--count", type=click.IntRange(1, 100), default=16, show_default=True)
@clear_errors
def visualize_multimnist(model_dir, dataset, data_dir, out, count):
    """MultiMNIST inputs with both reconstructed digits in red and green; wrong ones framed (Figure 5).

    \b
    Example: capstf visualize multimnist --model-dir runs/multimnist --count 8 --out mm.png
    """
    from capstf import visualize as figures
    click.echo(json.dumps(figures.multimnist(model_dir, out, dataset, data_dir, count)))


if __name__ == "__main__":
    main()
