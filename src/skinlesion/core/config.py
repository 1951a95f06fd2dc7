"""Typed, strict run configuration: defaults < YAML file < ``key=value`` overrides.

Every key is declared here; an unknown key or a value of the wrong type is an error that names
the key (``train.lr``), so a typo can never silently fall back to a default.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from skinlesion.core.errors import ConfigError
from skinlesion.core.overrides import coerce_numbers, merge_trees, parse_overrides
from skinlesion.core.sources import (
    SINGLE_SOURCE_KEYS,
    LabelledSetConfig,
    SourceConfig,
    check_set_keys,
    check_sources,
    error_key,
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True)


class DataConfig(LabelledSetConfig):
    """The ``data`` section: one labelled set (the keys of :class:`LabelledSetConfig`) or
    several (``sources``), and how their images are prepared."""

    KEY_PREFIX: ClassVar[str] = "data."
    ROOT_LATER: ClassVar[bool] = True

    image_size: int | tuple[int, int] = 300
    """Input size: ``S`` for S x S, or ``[H, W]`` (HAM10000 is 4:3, e.g. ``[192, 256]``), so a
    lesion need not be squashed. Non-square inputs use the 4 TTA views that keep the shape."""
    cache_dir: str | None = None
    """Where decoded images are cached; default ``$SKINLESION_CACHE`` or ``~/.cache/skinlesion``."""
    colour_constancy: bool = False
    """Shades-of-Gray colour constancy (p=6) applied when images are cached and at inference."""
    interpolation: Literal["bilinear", "bicubic"] = "bicubic"
    match_detail: bool = True
    """Measure the training images' detail (longer side, JPEG quality) and store it in the
    model's preprocessing spec, so that a larger input is reduced to it before the model's own
    resize (another clinic's full-resolution image seen as the model learned its thumbnails)."""
    sources: list[SourceConfig] | None = None
    """Several labelled sets in one run (:mod:`skinlesion.core.sources`), each with its own
    ``name``, format keys and ``classes``; ``None``: the one set the keys above describe."""

    def labelled_sets(self) -> list[LabelledSetConfig]:
        """The section's labelled sets: its ``sources``, or the one set at its top (itself)."""
        return list(self.sources) if self.sources is not None else [self]

    @field_validator("image_size", mode="before")
    @classmethod
    def _size_list(cls, v: Any) -> Any:
        return tuple(v) if isinstance(v, list) else v

    @model_validator(mode="after")
    def _format_keys(self) -> DataConfig:
        check_sources(self)  # first: a single-set key beside sources is named as such
        check_set_keys(self)
        return self

    @field_validator("image_size")
    @classmethod
    def _size_range(cls, v: int | tuple[int, int]) -> int | tuple[int, int]:
        for side in (v,) if isinstance(v, int) else v:
            if not 16 <= side <= 1024:
                raise ValueError(f"each side must be in 16..1024 pixels, got {side}")
        return v


DEFAULT_N_FOLDS = 5
DEFAULT_FOLD_SEED = 42
"""``cv.n_folds`` and ``cv.seed`` unless a config sets them: the one owner of the fold defaults,
which the functions that make or check folds outside a config take as theirs."""


class CVConfig(_Strict):
    n_folds: int = Field(DEFAULT_N_FOLDS, ge=2)
    folds_to_run: list[int] | None = None
    """Subset of folds to train (e.g. ``[0]``); ``None`` = all."""
    seed: int = DEFAULT_FOLD_SEED
    grouped: bool = True
    """Group folds by lesion. ``false`` leaks lesions across folds: only for the leakage audit."""
    folds_file: str | None = None
    """A ``folds.csv`` from ``skinlesion split``; default: folds are made and saved in the run."""
    holdout_column: str | None = None
    """Cross-site validation: the column that names each image's site (``dataset`` for
    HAM10000's acquisition sources; a source of ``data.sources`` without that column is a site
    named after the source). Model K is trained on every other site and tested on
    ``cv.holdout[K]``; early stopping and temperature come from fold 0 of the other sites' own
    lesion-grouped folds, never from the held-out site. ``None``: k-fold cross-validation."""
    holdout: list[str] | None = None
    """Cross-site validation: the sites held out, one model each, in this order; ``None``: every
    site of ``cv.holdout_column``."""

    @model_validator(mode="after")
    def _holdout_keys(self) -> CVConfig:
        if self.holdout is not None and self.holdout_column is None:
            raise ValueError("cv.holdout names sites: set cv.holdout_column too")
        if self.holdout is not None and (
            not self.holdout or len(set(self.holdout)) < len(self.holdout)
        ):
            raise ValueError(f"cv.holdout={self.holdout}: name each site once, or null for all")
        return self

    @model_validator(mode="after")
    def _folds_exist(self) -> CVConfig:
        # Checked here, where n_folds is known, so a fold that does not exist fails before the
        # data loads and before a run folder exists. The folds of a folds_file are checked
        # against the file (training.checks).
        folds = self.folds_to_run
        if folds is None:
            return self
        if not folds:
            raise ValueError("cv.folds_to_run is empty; give fold numbers, or null for all")
        if len(set(folds)) != len(folds):
            raise ValueError(f"cv.folds_to_run={folds} names a fold twice")
        outside = [f for f in folds if not 0 <= f < self.n_folds]
        if self.holdout_column is not None:  # one model per site: checked against the sites
            outside = [f for f in folds if f < 0]
        if outside and self.folds_file is None:
            raise ValueError(
                f"cv.folds_to_run={folds}: no fold {', '.join(map(str, outside))}; "
                f"cv.n_folds={self.n_folds} makes folds 0..{self.n_folds - 1}"
            )
        return self


class ModelConfig(_Strict):
    backbone: str = "efficientnet_b3"
    pretrained: bool = True
    weights: str | None = None
    """A local weights file to load instead of the provider's (``.pth``/``.safetensors``)."""
    drop_rate: float = Field(0.3, ge=0.0, lt=1.0)
    drop_path_rate: float = Field(0.2, ge=0.0, lt=1.0)
    metadata: list[Literal["age", "sex", "localization"]] = []
    """Patient metadata fused with the image (e.g. ``[age, sex, localization]``); empty = images
    only. Read from the data table's columns of these names."""
    metadata_hidden: int = Field(128, ge=0, le=4096)
    """Width of the metadata MLP (2 layers) before it joins the image embedding; 0 joins the
    encoded vector directly. The linear probe always joins it directly."""
    metadata_drop: float = Field(0.2, ge=0.0, lt=1.0)
    """Training: probability that an image's whole metadata vector is replaced by the
    all-missing encoding, so the model also works without metadata."""
    metadata_sites: Literal["general", "as_is"] = "general"
    """``general``: anatomical sites mapped to the ISIC archive's general sites (HAM10000's
    ``back`` -> ``posterior torso``, ...), so a model reads other datasets' sites; ``as_is``:
    each dataset's own names."""

    @field_validator("metadata")
    @classmethod
    def _unique_fields(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"a field is listed twice in {v}")
        return v


class TrainConfig(_Strict):
    scheme: Literal["finetune", "linear_probe"] = "finetune"
    """``linear_probe``: frozen backbone, cached embeddings, a linear head per fold (minutes on
    a CPU)."""
    freeze_stages: int = Field(0, ge=0)
    """Fine-tune only the last stages: the stem and the first K stages stay frozen."""
    mixstyle: float = Field(0.0, ge=0, le=1)
    """MixStyle: probability that a batch's feature statistics are mixed between its images
    after each of ``mixstyle_stages`` (training only; 0 = off)."""
    mixstyle_alpha: float = Field(0.1, gt=0)
    """MixStyle's mixing weight is drawn from Beta(alpha, alpha)."""
    mixstyle_stages: list[int] = [1, 2, 3]
    probe_flips: bool = True
    """Linear probe: average each embedding over the image and its h/v flips."""
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(32, ge=1)
    """The global batch: images per optimizer step, whatever the number of processes. Under
    ``torchrun`` with N processes each takes ``batch_size / N`` of every batch (N must divide
    it), so a recipe takes the same steps on any N."""
    sync_bn: bool = True
    """Under ``torchrun``: BatchNorm statistics over the whole global batch, across processes
    (no effect in one process). On by default because only then do N processes train as one
    (with ``batch_size`` the global batch: the same weights up to float rounding); off, each
    process normalises its own ``batch_size / N`` images, so the recipe changes with N and
    degrades at the 2-4 images per process that many GPUs leave. The price is a small
    all-reduce per BatchNorm layer forward and backward, a sync point each: on a shared 2-core
    CPU, 2 processes of lite0 at 96 px with 16 images each took 1.9 s a step against 0.9 s
    unsynchronised; set ``false`` for speed where per-process batches are large."""
    eval_batch_size: int | None = Field(None, ge=1)
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(1e-2, ge=0)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    scheduler: Literal["cosine", "plateau", "none"] = "cosine"
    warmup_epochs: int = Field(1, ge=0)
    patience: int | None = Field(5, ge=1)
    """Early stopping: epochs without a lower validation loss; ``None`` disables it."""
    average_from: int = Field(0, ge=0)
    """Weight averaging (SWA, dense as in SWAD; 0 = off): from this epoch on, the running mean of
    the weights after every step, validated beside the trained weights each epoch; the lower
    validation loss is the epoch's candidate (the average's alone with ``average_only``)."""
    average_only: bool = False
    steps_per_epoch: int | None = Field(None, ge=1)
    """Batches drawn per epoch; default: one pass over the fold's training images."""
    grad_clip: float | None = Field(None, gt=0)
    device: str = "auto"
    amp: bool = True
    """Mixed precision on CUDA (bf16 where supported, else fp16 with a grad scaler)."""
    channels_last: bool = True
    compile: bool = False
    deterministic: bool = False
    num_threads: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _average_within_epochs(self) -> TrainConfig:
        if self.average_from > self.epochs:
            raise ValueError(
                f"train.average_from={self.average_from} is after the last epoch {self.epochs}"
            )
        if self.average_only and not self.average_from:
            raise ValueError("train.average_only needs train.average_from (the epoch it starts)")
        if self.average_from and self.scheme == "linear_probe":
            raise ValueError("train.average_from averages fine-tuned weights: scheme=finetune")
        return self


class LossConfig(_Strict):
    name: str = "focal"
    gamma: float = Field(2.0, ge=0)
    alpha: list[float] | None = None
    """Per-class weights for the focal loss, in class order; ``None`` = unweighted."""
    label_smoothing: float = Field(0.0, ge=0, lt=1)


class SamplerConfig(_Strict):
    name: str = "weighted"
    power: float = Field(1.0, ge=0)
    """Weight of an image = (1 / class frequency) ** power; 1 draws classes uniformly."""


class AugmentConfig(_Strict):
    """Random augmentation magnitudes (the ``augment`` section, and what
    :func:`skinlesion.data.augment.augment_batch` takes); every parameter is drawn
    independently per sample."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    hflip: float = Field(0.5, ge=0, le=1)
    """Probability of a horizontal flip."""
    vflip: float = Field(0.5, ge=0, le=1)
    rotation: float = Field(180.0, ge=0, le=180)
    """Max |degrees|, uniform in [-rotation, rotation]; dermoscopy has no canonical orientation."""
    scale: tuple[float, float] = (0.9, 1.1)
    """Zoom factor range (>1 zooms in), in the same affine pass."""
    brightness: float = Field(0.3, ge=0)
    """ColorJitter semantics: factor uniform in [1-b, 1+b]."""
    contrast: float = Field(0.3, ge=0)
    saturation: float = Field(0.3, ge=0)
    hue: float = Field(0.1, ge=0, le=0.5)
    """Shift in [-h, h] of a full turn."""
    p_colour: float = Field(1.0, ge=0, le=1)
    """Probability that the colour jitter is applied to a sample."""
    aspect: tuple[float, float] = (1.0, 1.0)
    """Width/height stretch factor range, log-uniform; (1, 1) is off. Other sites' images come
    squashed to a square or at other aspects."""
    vignette: float = Field(0.0, ge=0, le=1)
    """Probability of a dark circular field of view (a contact dermatoscope's vignette), its
    radius uniform between the shorter half-side and the half-diagonal."""
    blur: float = Field(0.0, ge=0, le=1)
    """Probability of a Gaussian blur (an out-of-focus or lower-resolution camera)."""
    blur_sigma: tuple[float, float] = (0.3, 1.5)
    """Range of the blur's standard deviation, in pixels of the model input; uniform."""
    gamma: tuple[float, float] = (1.0, 1.0)
    """Range of a gamma curve ``x ** gamma``, log-uniform; (1, 1) is off. Cameras differ in their
    tone curve."""
    channel_gain: float = Field(0.0, ge=0, lt=1)
    """Per-channel gains uniform in [1-g, 1+g], rescaled to keep the mean gain 1: a colour cast of
    another illuminant or white balance; 0 is off."""

    downscale: float = Field(0.0, ge=0, le=1)
    """Probability of a shrink by a factor in ``downscale_range`` (log-uniform) and back."""
    downscale_range: tuple[float, float] = (0.35, 1.0)
    jpeg: float = Field(0.0, ge=0, le=1)
    """Probability of a JPEG round trip at a quality in ``jpeg_quality`` (uniform)."""
    jpeg_quality: tuple[int, int] = (30, 95)

    @field_validator(
        "scale", "aspect", "blur_sigma", "gamma", "downscale_range", "jpeg_quality", mode="before"
    )
    @classmethod
    def _list_to_tuple(cls, v: Any) -> Any:
        return tuple(v) if isinstance(v, list) else v

    @field_validator("scale", "aspect", "blur_sigma", "gamma", "downscale_range", "jpeg_quality")
    @classmethod
    def _ordered_range(cls, v: tuple[float, float], info: ValidationInfo) -> tuple[float, float]:
        top = 100 if info.field_name == "jpeg_quality" else float("inf")
        if not 0.0 < v[0] <= v[1] <= top:
            raise ValueError(f"{info.field_name} must satisfy 0 < lo <= hi <= {top}, got {v}")
        return v


AugmentSettings = AugmentConfig  # the name of the section before it was the one definition


class EvalConfig(_Strict):
    tta: int = Field(1, ge=1, le=8)
    calibrate: bool = True
    """Fit a temperature per fold on its validation predictions and store it in the checkpoint."""
    n_boot: int = Field(1000, ge=0)
    familiarity: bool = True
    """Fit each model's familiarity (``refer``: "unlike the training images") after training, one
    more pass over the fold's images; ``false`` skips it, and ``skinlesion fit-familiarity`` fits
    it later."""


class TrackingConfig(_Strict):
    """Experiment tracking (:mod:`skinlesion.training.tracking`): TensorBoard event files in the
    run folder, and optionally an MLflow run. A tracker that fails warns once and the training
    goes on; only the main process of a distributed run logs."""

    tensorboard: bool = True
    """Per-epoch scalars and each fold's confusion matrix in ``fold_K/tensorboard/``
    (``tensorboard --logdir RUN``); ``false`` writes nothing."""
    mlflow_uri: str | None = Field(None, pattern=r"\S")
    """An MLflow tracking URI: ``sqlite:///mlflow.db``, ``file:./mlruns`` or a server's
    ``http(s)://host:port``; ``None``: no MLflow. Needs ``pip install skinlesion[tracking]``."""
    mlflow_experiment: str = Field("skinlesion", pattern=r"\S")
    """The MLflow experiment the run is logged under (created when missing)."""


class Config(_Strict):
    data: DataConfig = DataConfig()
    cv: CVConfig = CVConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    loss: LossConfig = LossConfig()
    sampler: SamplerConfig = SamplerConfig()
    augment: AugmentConfig = AugmentConfig()
    eval: EvalConfig = EvalConfig()
    tracking: TrackingConfig = TrackingConfig()
    output_dir: str = "runs/default"
    seed: int = 42

    @model_validator(mode="after")
    def _tta_fits_shape(self) -> Config:
        size = self.data.image_size
        if not isinstance(size, int) and size[0] != size[1] and self.eval.tta > 4:
            raise ValueError(
                f"eval.tta={self.eval.tta}, but a non-square data.image_size {list(size)} has only "
                f"4 views that keep its shape (identity, flips, rot180); use eval.tta <= 4"
            )
        return self


def check_name(key: str, value: str, known: Iterable[str], what: str = "name") -> None:
    """Raise :class:`ConfigError` naming ``key`` and the close matches if ``value`` is unknown.

    >>> check_name("loss.name", "focall", ["focal", "ce"], "loss")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    skinlesion.core.errors.ConfigError: loss.name: unknown loss 'focall'; did you mean focal? ...
    """
    names = sorted(known)
    if value in names:
        return
    raise ConfigError(f"{key}: unknown {what} '{value}'; " + close_matches(value, names))


def close_matches(value: str, known: Sequence[str], listed: int = 12) -> str:
    """``did you mean A, B? (known: ...)``: the close matches first, then the known names."""
    close = difflib.get_close_matches(value, known, n=5, cutoff=0.6)
    shown = ", ".join(known[:listed]) + (
        f", ... ({len(known)} in all)" if len(known) > listed else ""
    )
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return f"{hint}(known: {shown})"


def _section_model(annotation: Any) -> type[BaseModel] | None:
    """The config section class inside a field's type (``X``, ``X | None``, ``list[X]``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _section_model(arg)
        if found is not None:
            return found
    return None


def section_keys(loc: Sequence[int | str]) -> list[str]:
    """The keys the config section at ``loc`` declares (``("data",)``: ``format``, ``root``,
    ...; a list's position is skipped); ``[]`` where ``loc`` names no section.

    >>> section_keys(("data", "columns"))
    ['image', 'label', 'group', 'age', 'sex', 'localization']
    """
    model: type[BaseModel] | None = Config
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part)) if model is not None else None
        model = _section_model(field.annotation) if field is not None else None
    return list(model.model_fields) if model is not None else []


def _format_validation_error(
    err: ValidationError, source: str, tree: dict[str, Any] | None = None
) -> str:
    lines = [f"invalid configuration ({source}):"]
    for e in err.errors():
        key, in_source = error_key(e["loc"], tree)
        if e["type"] == "extra_forbidden":
            known = section_keys(e["loc"][:-1])
            hint = f"; {close_matches(str(e['loc'][-1]), known)}" if known else ""
            lines.append(f"  {key}: unknown key{hint}")
        elif e["type"] == "literal_error" and isinstance(e.get("input"), str):
            expected = [x.strip(" '") for x in e["ctx"]["expected"].replace(" or ", ",").split(",")]
            choices = sorted(x for x in expected if x)
            lines.append(
                f"  {key}: unknown value '{e['input']}'; {close_matches(e['input'], choices)}"
            )
        elif e["type"] == "value_error" and isinstance(e.get("input"), dict):
            # A check across keys of a section: its message names them, the input adds noise.
            prefix = f"{key}: " if in_source else ""  # a source's message names the source
            lines.append(f"  {prefix}{str(e['msg']).removeprefix('Value error, ')}")
        else:
            lines.append(f"  {key}: {e['msg']} (got {e.get('input')!r})")
    if len(lines) == 2:  # one fault: one line
        return f"{lines[0]} {lines[1].strip()}"
    return "\n".join(lines)


def build_config(tree: dict[str, Any], source: str = "config") -> Config:
    """Validate a nested dict against the schema, naming every bad key."""
    try:
        return Config.model_validate(coerce_numbers(tree, Config))
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source, tree)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file, then ``key=value`` overrides.

    >>> cfg = load_config(None, ["train.epochs=2"])
    >>> cfg.train.epochs
    2
    """
    tree: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({err})") from err
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        tree = loaded
        source = str(path)
    if overrides:
        tree = merge_trees(tree, parse_overrides(overrides))
        source += " + overrides"
    return build_config(tree, source)


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain types only (lists, not tuples), so it round-trips through YAML and checkpoints.

    ``data.sources`` is left out when unset, so a single-source run's config is what it was
    before the key existed; with sources, the single-source keys (all defaults) are left out.
    """
    unused = {"sources"} if cfg.data.sources is None else set(SINGLE_SOURCE_KEYS)
    return _plain(cfg.model_dump(mode="python", exclude={"data": unused}))


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
