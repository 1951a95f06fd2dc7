"""Everything a run needs, checked before any fold, cache entry or run folder exists.

Names are looked up in their registries (backbones through timm's list and the weight providers,
losses, samplers; ``train.scheme`` is checked by the schema), each error naming the key and the
close matches; input paths must exist and output folders must be writable.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from skinlesion.core.config import Config, check_name
from skinlesion.core.errors import ConfigError, DataError
from skinlesion.core.paths import check_writable_dir
from skinlesion.data.cache import default_cache_dir
from skinlesion.data.datasets import LabelledSet
from skinlesion.data.folds import read_folds
from skinlesion.data.sampling import SAMPLERS
from skinlesion.data.sources import check_data_paths, load_labelled
from skinlesion.models.backbones import check_backbone
from skinlesion.training.losses import LOSSES


def check_names(cfg: Config) -> None:
    """Every registry name of the config is known (the cheap checks, no files touched)."""
    check_backbone(cfg.model.backbone, "model.backbone")
    check_name("loss.name", cfg.loss.name, LOSSES, "loss")
    check_name("sampler.name", cfg.sampler.name, SAMPLERS, "sampler")
    check_tracking_packages(cfg)
    if cfg.data.sources is not None and cfg.train.scheme == "linear_probe":
        raise ConfigError(
            "train.scheme=linear_probe does not take data.sources (its head is fitted without "
            "the sources' label spaces); use train.scheme=finetune"
        )


def check_tracking_packages(cfg: Config) -> None:
    """The packages ``cfg.tracking`` needs are installed (a server that is down is only a
    warning when the run starts; a missing package is the user's to fix before it)."""
    needed = {"tensorboard": cfg.tracking.tensorboard, "mlflow": cfg.tracking.mlflow_uri}
    uri = cfg.tracking.mlflow_uri or ""
    if uri.startswith(("sqlite:", "postgresql", "mysql", "mssql")):
        needed.update(sqlalchemy=True, alembic=True)  # MLflow's database stores
    missing = [name for name, wanted in needed.items() if wanted and not _installed(name)]
    if missing:
        key = "tracking.tensorboard" if missing == ["tensorboard"] else "tracking.mlflow_uri"
        raise ConfigError(
            f"{key}: needs {', '.join(missing)}, not installed; pip install 'skinlesion[tracking]'"
            f" (or set {key}={'false' if key == 'tracking.tensorboard' else 'null'})"
        )


def _installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _check_folds_file_folds(cfg: Config) -> None:
    """``cv.folds_to_run`` names folds of ``cv.folds_file`` (without a file the schema checks
    them against ``cv.n_folds``)."""
    if cfg.cv.folds_file is None or cfg.cv.folds_to_run is None:
        return
    present = sorted(set(read_folds(Path(cfg.cv.folds_file))["fold"].tolist()))
    unknown = [f for f in cfg.cv.folds_to_run if f not in present]
    if unknown:
        raise ConfigError(
            f"cv.folds_to_run={cfg.cv.folds_to_run}: no fold {', '.join(map(str, unknown))} in "
            f"cv.folds_file {cfg.cv.folds_file} (its folds: {present})"
        )


def check_paths(cfg: Config) -> None:
    """Inputs exist (each labelled set's, :func:`~skinlesion.data.sources.check_data_paths`);
    ``output_dir`` and ``data.cache_dir`` can be written."""
    check_data_paths(cfg.data)
    for key, value in (
        ("cv.folds_file", cfg.cv.folds_file),
        ("model.weights", cfg.model.weights),
    ):
        if value is not None and not Path(value).is_file():
            raise DataError(f"{key}: file {value} not found")
    _check_folds_file_folds(cfg)
    check_writable_dir(cfg.output_dir, "output_dir")
    cache = Path(cfg.data.cache_dir) if cfg.data.cache_dir else default_cache_dir()
    check_writable_dir(cache, "data.cache_dir" if cfg.data.cache_dir else f"image cache {cache}")


def check_world_size(cfg: Config, world_size: int) -> None:
    """The run fits ``world_size`` processes (``torchrun``'s, before joining them): the linear
    probe runs in one, and ``train.batch_size``, the global batch, splits evenly into at least
    2 images per process (BatchNorm and the trainer skip a 1-image batch)."""
    if world_size <= 1:
        return
    if cfg.train.scheme == "linear_probe":
        raise ConfigError(
            f"train.scheme=linear_probe runs in one process, not {world_size}; drop torchrun"
        )
    batch = cfg.train.batch_size
    if batch % world_size or batch < 2 * world_size:
        fits = max(2, round(batch / world_size)) * world_size
        raise ConfigError(
            f"train.batch_size={batch} (the global batch) does not split evenly across world "
            f"size {world_size} (torchrun processes) with at least 2 images each; use a "
            f"multiple of {world_size} from {2 * world_size}, e.g. train.batch_size={fits}"
        )


def load_checked_data(cfg: Config) -> LabelledSet:
    """The labelled set of the ``data`` section, read and checked (labels, filters, images found;
    cross-site: every image names a site and ``cv.holdout`` names sites of it), so that its
    faults show before any run folder exists; the run then uses it as it is."""
    if cfg.cv.holdout_column is not None and cfg.train.scheme == "linear_probe":
        raise ConfigError("cv.holdout_column: cross-site validation needs train.scheme=finetune")
    from skinlesion.training.run_data import holdout_sites, with_sites

    labelled = load_labelled(cfg)
    if cfg.cv.holdout_column is not None:
        holdout_sites(with_sites(labelled.table, cfg), cfg)
    return labelled


def check_config(cfg: Config) -> None:
    """:func:`check_names`, then :func:`check_paths`: in seconds, before any work."""
    check_names(cfg)
    check_paths(cfg)
