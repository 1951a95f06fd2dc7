"""The run folder: the one place that spells its file names and reads its saved config.

A run folder explains itself::

    runs/NAME/
      config.yaml  folds.csv  environment.json  train.log  dataset.json
      fold_K/metrics.csv   per-epoch train/val figures
      fold_K/best.pt       lowest validation loss (calibrated temperature added at the end)
      fold_K/last.pt       full training state for --resume
      fold_K/val_predictions.csv  fold_K/summary.json   (cross-site: the held-out site's
      fold_K/inner_val_predictions.csv                  predictions, then the validation's)
      fold_K/familiarity.safetensors  the refer check "unlike the training images"
      fold_K/tensorboard/  TensorBoard event files (tracking.tensorboard)
      tracking.json        the MLflow run ids, which --resume continues (tracking.mlflow_uri)
      oof_predictions.csv  oof_metrics.json  report.md  plots/

>>> run = RunFolder(Path("runs/quick"))
>>> run.fold(2).best
PosixPath('runs/quick/fold_2/best.pt')
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from skinlesion.core.config import Config, EvalConfig, build_config, config_to_dict, load_config
from skinlesion.core.errors import ConfigError

_FOLD_RE = re.compile(r"^fold_(\d+)$")

# Config keys that may differ between runs of one recipe: where a part wrote, which folds it ran,
# and machine settings that do not change the models (the image cache is only a cache). They are
# also the only keys --resume may change: output_dir differs only for a moved folder; the image
# cache is keyed by the source files, size and preprocessing, so any copy holds the same pixels;
# device and threads change the speed (and float rounding), not the recipe; each fold is
# seeded by its number alone, so training more (or other) folds leaves the others as they were;
# tracking only records what is trained.
PER_RUN_KEYS: tuple[tuple[str, ...], ...] = (
    ("cv", "folds_to_run"),
    ("output_dir",),
    ("train", "device"),
    ("train", "num_threads"),
    ("data", "cache_dir"),
    ("tracking", "tensorboard"),
    ("tracking", "mlflow_uri"),
    ("tracking", "mlflow_experiment"),
)


# The config sections that define the models of a run: --resume refuses to change them, and
# the checkpoints of one ensemble must agree on them (``train`` and ``eval`` may change on resume).
RECIPE_SECTIONS: tuple[str, ...] = ("data", "cv", "model", "loss", "sampler", "augment")


def fold_number(folder: Path) -> int | None:
    """``K`` of a ``fold_K`` folder, else ``None``."""
    m = _FOLD_RE.match(folder.name)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class FoldFolder:
    """``fold_K/`` of a run."""

    root: Path

    @property
    def number(self) -> int:
        k = fold_number(self.root)
        if k is None:
            raise ValueError(f"{self.root} is not a fold_K folder")
        return k

    @property
    def best(self) -> Path:
        return self.root / "best.pt"

    @property
    def last(self) -> Path:
        return self.root / "last.pt"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.csv"

    @property
    def val_predictions(self) -> Path:
        return self.root / "val_predictions.csv"

    @property
    def inner_val_predictions(self) -> Path:
        """Cross-site validation: the training sites' validation images (``val_predictions.csv``
        holds the held-out site's)."""
        return self.root / "inner_val_predictions.csv"

    @property
    def holdout_unfamiliarity(self) -> Path:
        """Cross-site validation: ``image_id, unfamiliarity`` of the held-out site's images."""
        return self.root / "holdout_unfamiliarity.csv"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def finished(self) -> bool:
        return self.summary.is_file()

    def read_summary(self) -> dict[str, Any]:
        return json.loads(self.summary.read_text())

    def write_summary(self, summary: dict[str, Any]) -> None:
        self.summary.write_text(json.dumps(summary, indent=2))


@dataclass(frozen=True)
class RunFolder:
    """Paths of one run folder; nothing is created until something is written."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def folds(self) -> Path:
        return self.root / "folds.csv"

    @property
    def environment(self) -> Path:
        return self.root / "environment.json"

    @property
    def train_log(self) -> Path:
        return self.root / "train.log"

    @property
    def dataset(self) -> Path:
        """``dataset.json``: the data's source, class list and whether it names groups."""
        return self.root / "dataset.json"

    def read_dataset(self) -> dict[str, Any]:
        """``dataset.json`` (``{}`` for a run made before it existed: HAM10000, grouped)."""
        if not self.dataset.is_file():
            return {}
        return json.loads(self.dataset.read_text())

    @property
    def oof_predictions(self) -> Path:
        return self.root / "oof_predictions.csv"

    @property
    def oof_metrics(self) -> Path:
        return self.root / "oof_metrics.json"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    @property
    def tracking(self) -> Path:
        """``tracking.json``: the MLflow run ids of the run and its folds."""
        return self.root / "tracking.json"

    def fold(self, k: int) -> FoldFolder:
        return FoldFolder(self.root / f"fold_{k}")

    def fold_folders(self) -> list[FoldFolder]:
        """Every ``fold_K`` folder present, by ``K``."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if p.is_dir() and fold_number(p) is not None]
        return [FoldFolder(p) for p in sorted(found, key=lambda p: fold_number(p) or 0)]

    def best_checkpoints(self) -> list[Path]:
        return [f.best for f in self.fold_folders() if f.best.is_file()]

    def val_prediction_files(self) -> list[Path]:
        return [f.val_predictions for f in self.fold_folders() if f.val_predictions.is_file()]

    def has_results(self) -> bool:
        return any(f.best.is_file() or f.last.is_file() for f in self.fold_folders())

    def read_config_tree(self) -> dict[str, Any]:
        """The saved ``config.yaml`` as plain data (``{}`` when there is none)."""
        if not self.config.is_file():
            return {}
        try:
            tree = yaml.safe_load(self.config.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{self.config}: not valid YAML ({err})") from err
        if not isinstance(tree, dict):
            raise ConfigError(f"{self.config}: expected a mapping at the top level")
        return tree

    @classmethod
    def of_checkpoint(cls, path: Path) -> RunFolder | None:
        """The run holding ``path`` when it sits at ``RUN/fold_K/best.pt``, else ``None``."""
        path = Path(path)
        if fold_number(path.parent) is None:
            return None
        return cls(path.parent.parent)


def saved_eval_settings(tree: dict[str, Any] | None, source: str) -> EvalConfig:
    """The ``eval`` section of a saved config (a run's, or one stored in a checkpoint), typed.

    Only this section is read, so a config written by another version still gives its
    ``eval.tta`` and ``eval.n_boot``; a missing section gives the defaults.
    """
    section = (tree or {}).get("eval") or {}
    try:
        return build_config({"eval": section}, source).eval
    except ConfigError as err:
        raise ConfigError(f"{source}: its eval settings do not fit ({err})") from None


def _current_names(tree: dict[str, Any]) -> dict[str, Any]:
    """A saved config tree with renamed keys under their current names (``data.metadata``, and
    a source's ``metadata``, are ``labels``), so configs saved before a rename compare equal."""
    data = tree.get("data")
    if not isinstance(data, dict):
        return tree
    for section in [data, *[s for s in data.get("sources") or () if isinstance(s, dict)]]:
        old = section.pop("metadata", None)
        if old is not None and section.get("labels") is None:
            section["labels"] = old
    return tree


def recipe_of(tree: dict[str, Any]) -> dict[str, Any]:
    """A saved config without its :data:`PER_RUN_KEYS`: equal for runs of one recipe."""
    out = _current_names(json.loads(json.dumps(tree)))
    for path in PER_RUN_KEYS:
        node = out
        for key in path[:-1]:
            node = node.get(key, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(path[-1], None)
    return out


def config_leaves(tree: dict[str, Any], schema: type[BaseModel] = Config) -> dict[str, Any]:
    """``{"train.lr": 0.0003, ...}``: every key of the schema with its value in ``tree`` (a
    config as plain data); a mapping-valued key (``data.where``) is one leaf."""
    out: dict[str, Any] = {}
    for name, field in schema.model_fields.items():
        value = tree.get(name)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel) and isinstance(value, dict):
            out.update({f"{name}.{k}": v for k, v in config_leaves(value, ann).items()})
        else:
            out[name] = value
    return out


def resume_changes(saved: Config, new: Config) -> list[str]:
    """``"train.lr: 0.0003 -> 0.001"`` for every key that differs, but the :data:`PER_RUN_KEYS`."""
    free = {".".join(k) for k in PER_RUN_KEYS}
    old_leaves = config_leaves(config_to_dict(saved))
    new_leaves = config_leaves(config_to_dict(new))
    return [
        f"{key}: {old_leaves[key]!r} -> {new_leaves[key]!r}"
        for key in old_leaves
        if key not in free and old_leaves[key] != new_leaves[key]
    ]


def check_resume_config(saved_path: Path, new: Config, hint: str = "") -> Config:
    """The config saved at ``saved_path``, if ``new`` changes none of the keys that decide what
    is trained; else :class:`ConfigError` naming each changed key with its old and new value.

    Read through the schema, so a key added since the file was written compares as its default.
    """
    saved = load_config(saved_path)
    changes = resume_changes(saved, new)
    if changes:
        free = ", ".join(".".join(k) for k in PER_RUN_KEYS)
        raise ConfigError(
            f"--resume would change what {saved_path} was trained with: {'; '.join(changes)}"
            f"{hint}; keep the saved values or choose another output folder (only {free} may "
            f"change on resume)"
        )
    return saved
