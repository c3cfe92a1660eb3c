"""Experiment configuration: a recipe from `pipelines/`, plus overrides, saved in the model dir.

A recipe is a TOML file with [data], [model] and [train] tables (fields below), a [paper]
table (the paper's reported result, for reference) and a [runlocal] table of dotted-key
overrides that shrink the same experiment for a quick local run.
"""
import dataclasses
import re
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

from capstf.catalog import DATA_SETS, IMAGE_SETS, TFDS_PREFIX, Canvas, data_set
from capstf.errors import CapstfError
from capstf.files import read_json, write_json


def fit_model_to(model: "ModelConfig", canvas: Canvas) -> "ModelConfig":
    """The model config with the data set's input size, digits per image, channels and classes."""
    return dataclasses.replace(model, input_size=canvas.size, digits_per_image=canvas.digits_per_image,
                               channels=canvas.channels, num_classes=canvas.num_classes)
ROUTING_GRADIENTS = ("all", "final")  # see capstf.layers.route_by_agreement


@dataclasses.dataclass(frozen=True)
class DataConfig:
    dataset: str = "mnist"           # a name in capstf.catalog.DATA_SETS, or tfds:NAME[:CONFIG]
    data_dir: str = ""               # "" = TFDS; "sample" = bundled digits; an IDX folder; a TFDS data dir
    validation_digits: int = 0       # the last this many training digits are held out for validation
    max_shift: int = 2               # training shift per axis, in pixels (TFDS image sets: zero padding
                                     # per side before the random crop)
    random_flip: bool = False        # TFDS image sets, training: mirror left-right half the time
    max_brightness_delta: float = 0.0  # TFDS image sets, training: add a brightness offset in [-this, this]
    max_contrast_change: float = 0.0   # TFDS image sets, training: scale each channel's contrast by 1 +- this
    train_max_rotation_deg: float = 0.0  # single-digit sets, training: also rotate by up to this
    train_max_scale_change: float = 0.0  # single-digit sets, training: also scale by 1 +- up to this
    train_rotate_scale_epochs: float = 0.0  # rotate and scale only in the first this many epochs (0: all)
    partners_per_digit: int = 1000   # MultiMNIST test set size = test digits x this
    max_rotation_deg: float = 20.0   # affNIST-style test set: rotation in degrees, +-
    max_shear: float = 0.2           # affNIST-style test set: shear, +-
    min_scale: float = 0.8           # affNIST-style test set: scale per axis, from
    max_scale: float = 1.2           # affNIST-style test set: scale per axis, up to


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    kind: str = "capsnet"            # capsnet, the paper's baseline CNN, the authors' CNN (cnn-two-pools)
                                     # or a CNN without pooling (capstf.model.baseline)
    input_size: int = 28             # set from the data set's canvas
    channels: int = 1                # set from the data set
    num_classes: int = 10            # set from the data set
    digits_per_image: int = 1        # set from the data set (MultiMNIST: 2)
    conv1_filters: int = 256         # Conv1's channels (9x9, stride 1)
    primary_caps_types: int = 32     # PrimaryCaps' capsule types (9x9 convolution, stride 2)
    primary_caps_dim: int = 8        # PrimaryCaps' capsule size
    digit_caps_dim: int = 16         # DigitCaps' capsule size (one capsule per class)
    routing_iters: int = 3           # routing-by-agreement iterations
    routing_gradients: str = "all"   # all: through every iteration (Procedure 1); final: the agreement
                                     # updates see u_hat as constant
    routing_none_of_the_above: bool = False  # an extra routing parent fixed at logit 0 (the paper's CIFAR10)
    decoder: bool = True             # the reconstruction decoder and its loss
    reconstruction_weight: float = 0.0005  # the reconstruction loss' weight beside the margin loss
    # Where the authors' code (Sarasra/models, research/capsules) differs from the paper's text:
    margin_loss_scale: float = 1.0   # x Eq. 4 summed over classes; their layers.py `_margin_loss`
                                     # halves the mean over classes: 0.5 / 10 = 0.05
    capsule_biases: bool = False     # their layers.py: a bias on DigitCaps' s_j, and PrimaryCaps as
                                     # one routing iteration from one input (conv / types + bias)
    decoder_init: str = "glorot-uniform"  # Keras' default, or their variables.py's (stddev 0.1, biases 0.1)
    baseline_pool: bool = False      # baseline CNN: 2x2 max-pooling after its first two convolutions
    baseline_hidden: int = 328       # baseline CNN: width of its first hidden layer (the paper's 328)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 128            # global, over all replicas
    epochs: float = 10.0             # passes over the training examples
    steps: int = 0                   # if > 0, overrides epochs
    learning_rate: float = 1e-3      # Adam's (peak) learning rate
    schedule: str = "exponential"    # exponential decay, or cosine from learning_rate to 0 over the run
    decay_rate: float = 0.96         # exponential decay: lr * decay_rate ** (step / decay_steps)
    decay_steps: int = 2000          # exponential decay's steps (not staircase)
    seed: int = 0                    # initial weights and the order and randomness of the examples
    jit: str = "auto"                # what XLA compiles: the capsule layers, the whole step, nothing, or
                                     # auto (fastest measured per device)
    precision: str = "auto"          # the convolutions' precision; auto: fastest measured per device
    distribute: str = "auto"         # tf.distribute strategy; auto: multi-worker under TF_CONFIG, mirrored
                                     # over several GPUs, else one device
    checkpoint_every: int = 500      # steps between checkpoints
    keep_checkpoints: int = 3        # the newest this many are kept
    log_every: int = 50              # steps between TensorBoard scalars (and, without a terminal, log lines)
    eval_examples: int = 0           # test (or held-out) examples scored after each epoch (0: none)
    steps_per_call: int = 0          # training steps per compiled call; 0: auto (measured per device)
    data_service: str = ""           # grpc://HOST:PORT: generate on tf.data service workers; "": here


@dataclasses.dataclass(frozen=True)
class Config:
    data: DataConfig
    model: ModelConfig
    train: TrainConfig
    paper: Dict[str, Any] = dataclasses.field(default_factory=dict)
    recipe: str = ""

    def to_dict(self):
        return dataclasses.asdict(self)

    def with_settings(self, settings: Mapping[str, Any]) -> "Config":
        """A copy with {"section.name": value} settings changed (not validated again)."""
        sections = {}
        for dotted, value in settings.items():
            section, _, name = dotted.partition(".")
            sections.setdefault(section, {})[name] = value
        return dataclasses.replace(self, **{section: dataclasses.replace(getattr(self, section), **values)
                                            for section, values in sections.items()})

    @classmethod
    def from_dict(cls, d: Mapping) -> "Config":
        return cls(data=_build(DataConfig, d.get("data", {}), "data"),
                   model=_build(ModelConfig, d.get("model", {}), "model"),
                   train=_build(TrainConfig, d.get("train", {}), "train"),
                   paper=dict(d.get("paper", {})), recipe=d.get("recipe", ""))


TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _build(cls, values: Mapping, section: str):
    fields = {f.name: f.type for f in dataclasses.fields(cls)}
    unknown = set(values) - set(fields)
    if unknown:
        raise CapstfError(f"Unknown setting(s) {', '.join(f'{section}.{k}' for k in sorted(unknown))}; "
                          f"[{section}] accepts: {', '.join(sorted(fields))}.")
    for name, value in values.items():
        kind = fields[name]
        accepted = (int, float) if kind is float else (kind,)
        if not isinstance(value, accepted) or (isinstance(value, bool) and kind is not bool):
            raise CapstfError(f"{section}.{name} = {value!r}: expected {TYPE_NAMES[kind]}.")
    return cls(**values)


def recipe_names():
    return sorted(p.name[:-5] for p in resources.files("capstf.pipelines").iterdir()
                  if p.name.endswith(".toml"))


RECIPE_SECTIONS = ("data", "model", "train", "paper", "runlocal")


def load_recipe(name_or_path: str, extended_by: tuple = ()) -> dict:
    """A recipe by name (a file in pipelines/, found also when pip-installed) or by path.

    A recipe with `base = "NAME"` starts from recipe NAME and changes only the settings it lists.
    extended_by: the recipes that named this one as their base, to catch a loop.
    """
    path = Path(name_or_path)
    if path.suffix == ".toml" and path.is_file():
        text = path.read_text()
    else:
        candidate = resources.files("capstf.pipelines") / f"{name_or_path}.toml"
        if not candidate.is_file():
            raise CapstfError(f"No recipe {name_or_path!r}; known recipes: {', '.join(recipe_names())}.")
        text = candidate.read_text()
    try:
        recipe = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise CapstfError(f"Recipe {name_or_path}: {e}") from None
    base = recipe.pop("base", None)
    misplaced = [key for key, value in recipe.items() if key not in RECIPE_SECTIONS or not isinstance(value, dict)]
    if misplaced or not isinstance(base, (str, type(None))):
        raise CapstfError(f"Recipe {name_or_path}: {', '.join(misplaced) or 'base'} is out of place; a recipe "
                          f"holds an optional base = \"RECIPE\" and the sections "
                          f"{', '.join(f'[{s}]' for s in RECIPE_SECTIONS)}.")
    if base is not None:
        if base in extended_by + (name_or_path,):
            raise CapstfError(f"Recipe {name_or_path}: base recipes go round in a loop: "
                              f"{' -> '.join(extended_by + (name_or_path, base))}.")
        merged = load_recipe(base, extended_by + (name_or_path,))
        for table, values in recipe.items():
            merged[table] = {**merged.get(table, {}), **values}
        recipe = merged
    recipe["recipe"] = name_or_path
    return recipe


def resolve(recipe: str, overrides: Optional[Mapping[str, Any]] = None, runlocal: bool = False) -> Config:
    """Recipe -> Config: apply [runlocal] if asked, then overrides ({"train.steps": 5, ...})."""
    raw = load_recipe(recipe)
    local = raw.pop("runlocal", {})
    for key, value in list((local if runlocal else {}).items()) + list((overrides or {}).items()):
        _set(raw, key, value)
    return validate(Config.from_dict(raw))


def _set(raw: dict, dotted: str, value):
    section, _, name = dotted.partition(".")
    cls = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig}.get(section)
    field = {f.name: f for f in dataclasses.fields(cls)}.get(name) if cls else None
    if field is None:
        raise CapstfError(f"Unknown setting {dotted!r} (settings look like train.steps or model.routing_iters).")
    if isinstance(value, str) and field.type is not str:
        value = _parse(dotted, value, field.type)
    raw.setdefault(section, {})[name] = value


def _parse(key, text, kind):
    try:
        if kind is bool:
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return text.lower() in ("true", "1")
        return kind(text)
    except ValueError:
        raise CapstfError(f"{key}={text!r}: expected {TYPE_NAMES[kind]}.") from None


CHOICES = {"train.jit": ("auto", "routing", "step", "off"),
           "train.precision": ("auto", "float32", "mixed_bfloat16", "mixed_float16"),
           "train.distribute": ("auto", "mirrored", "multi-worker", "one-device"),
           "train.schedule": ("exponential", "cosine"),
           "model.kind": ("capsnet", "baseline", "cnn-two-pools", "cnn-no-pooling"),
           "model.routing_gradients": ROUTING_GRADIENTS,
           "model.decoder_init": ("glorot-uniform", "truncated-normal-0.1")}
AT_LEAST_1 = ("train.batch_size", "train.checkpoint_every", "train.decay_steps", "train.log_every",
              "train.keep_checkpoints", "data.partners_per_digit", "model.routing_iters", "model.conv1_filters",
              "model.primary_caps_types", "model.primary_caps_dim", "model.digit_caps_dim", "model.baseline_hidden")
AT_LEAST_0 = ("train.eval_examples", "train.steps_per_call", "model.reconstruction_weight", "data.validation_digits", "data.max_shift",
              "data.max_brightness_delta", "data.train_max_rotation_deg", "data.train_rotate_scale_epochs",
              "data.max_rotation_deg", "data.max_shear")
FROM_0_BELOW_1 = ("data.train_max_scale_change", "data.max_contrast_change")


def _setting(cfg, key):
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def validate(cfg: Config) -> Config:
    """Checks ranges; returns cfg with the model's input settings taken from the data set.
    Configs are frozen: what changes one returns a new one (dataclasses.replace)."""
    for key, allowed in CHOICES.items():
        if (value := _setting(cfg, key)) not in allowed:
            raise CapstfError(f"{key}={value!r}: choose one of {', '.join(allowed)}.")
    dataset = data_set(cfg.data.dataset)  # refuses an unknown name
    for key in AT_LEAST_1:
        if (value := _setting(cfg, key)) < 1:
            raise CapstfError(f"{key} must be at least 1, got {value}.")
    for key in AT_LEAST_0:
        if (value := _setting(cfg, key)) < 0:
            raise CapstfError(f"{key} must be at least 0, got {value}.")
    for key in FROM_0_BELOW_1:
        if not 0 <= (value := _setting(cfg, key)) < 1:
            raise CapstfError(f"{key} must be in [0, 1), got {value}.")
    data, train, model = cfg.data, cfg.train, cfg.model
    if not model.margin_loss_scale > 0:
        raise CapstfError(f"model.margin_loss_scale must be above 0, got {model.margin_loss_scale}.")
    if model.kind != "capsnet":  # a CNN with a softmax: no capsules, margin loss or decoder
        for key in ("model.margin_loss_scale", "model.capsule_biases", "model.decoder_init"):
            if _setting(cfg, key) != getattr(ModelConfig, key.split(".")[1]):
                raise CapstfError(f"{key} is for CapsNets; model.kind = {model.kind} has no capsules.")
    if model.kind not in ("capsnet", "baseline") and (model.baseline_pool or
                                                      model.baseline_hidden != ModelConfig.baseline_hidden):
        raise CapstfError(f"model.baseline_pool and model.baseline_hidden shape model.kind = baseline; "
                          f"{model.kind} has its own layers.")
    if model.kind == "capsnet" and model.decoder_init != ModelConfig.decoder_init and not model.decoder:
        raise CapstfError("model.decoder_init needs a decoder; model.decoder is false.")
    if train.data_service and not re.fullmatch(r"grpc://[^\s/:]+:\d+", train.data_service):
        raise CapstfError(f"train.data_service={train.data_service!r}: give the dispatcher as grpc://HOST:PORT.")
    if not 0 < train.learning_rate < 1:
        raise CapstfError(f"train.learning_rate must be in (0, 1), got {train.learning_rate}.")
    if not 0 < train.decay_rate <= 1:  # 0 stops training after one step; above 1 the rate grows
        raise CapstfError(f"train.decay_rate must be in (0, 1], got {train.decay_rate}.")
    if not 0 < data.min_scale <= data.max_scale:
        raise CapstfError(f"data.min_scale and data.max_scale must satisfy 0 < min_scale <= max_scale, got "
                          f"{data.min_scale} and {data.max_scale}.")
    if train.steps < 0 or train.epochs < 0 or (train.steps == 0 and train.epochs == 0):
        raise CapstfError("Train for a positive number of --steps or --epochs.")
    if (data.train_max_rotation_deg or data.train_max_scale_change) and dataset.examples != "digit":
        single_digits = [name for name, d in DATA_SETS.items() if d.examples == "digit"]
        raise CapstfError(f"Training rotation and scaling are for --dataset {' and '.join(single_digits)} only.")
    if (data.random_flip or data.max_brightness_delta or data.max_contrast_change) and dataset.digits:
        raise CapstfError("data.random_flip, data.max_brightness_delta and data.max_contrast_change are for "
                          f"the TFDS image data sets ({', '.join(IMAGE_SETS)}, {TFDS_PREFIX}NAME).")
    if dataset.canvas:  # a tfds: data set's shape is filled in once it is loaded
        return dataclasses.replace(cfg, model=fit_model_to(cfg.model, dataset.canvas))
    return cfg


def save(cfg: Config, model_dir: Path):
    write_json(model_dir / "config.json", cfg.to_dict())


def load_saved(model_dir: Path) -> Config:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise CapstfError(f"{model_dir} holds no trained model (no config.json); run `capstf train` first.")
    return Config.from_dict(read_json(path))


def changed_settings(saved: Config, new: Config) -> Dict[str, tuple]:
    """{"section.key": (old, new)} for every setting that differs (data, model, train)."""
    a, b = saved.to_dict(), new.to_dict()
    return {f"{section}.{key}": (a[section][key], value) for section in ("data", "model", "train")
            for key, value in b[section].items() if a[section][key] != value}


def describe_changes(changes: Mapping[str, tuple]) -> str:
    return "; ".join(f"{key}: {old} -> {new}" for key, (old, new) in changes.items())


WEIGHT_SHAPE_SETTINGS = {f"model.{name}" for name in (  # what the checkpoint's weights are shaped by
    "kind", "input_size", "channels", "num_classes", "digits_per_image", "conv1_filters", "primary_caps_types",
    "primary_caps_dim", "digit_caps_dim", "decoder", "capsule_biases", "baseline_pool", "baseline_hidden")}


# What decides which examples a run trains on, in which order: changed mid-run, a resumed run
# would train on formerly held-out digits (validation_digits) or reshuffle its epoch (seed).
DATA_ORDER_SETTINGS = {"data.validation_digits", "train.seed"}


def check_compatible(saved: Config, new: Config, model_dir, resuming=True) -> Dict[str, tuple]:
    """A model dir must not silently mix two experiments: the weights' shapes and the data set
    must match, and, once a checkpoint exists (`resuming`), what decides the training examples.

    Returns the other changed settings (schedule, loss weights, routing, augmentation, ...),
    which a resumed run may change but should say it did.
    """
    changed = changed_settings(saved, new)
    fixed = WEIGHT_SHAPE_SETTINGS | {"data.dataset"} | (DATA_ORDER_SETTINGS if resuming else set())
    incompatible = {k: v for k, v in changed.items() if k in fixed}
    if incompatible:
        raise CapstfError(f"{model_dir} holds a model trained with a different configuration "
                          f"({describe_changes(incompatible)}). Use another --model-dir, or the same settings.")
    return changed
