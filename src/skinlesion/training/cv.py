"""Cross-validated training: data -> folds -> cache -> one model per fold (:mod:`.fold`), resumable.

The run folder it writes is described in :mod:`skinlesion.core.run_folder`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from skinlesion.core.config import Config, save_config
from skinlesion.core.errors import ConfigError
from skinlesion.core.run_folder import RunFolder, check_resume_config
from skinlesion.core.runtime import (
    DistInfo,
    Runtime,
    environment_info,
    init_distributed,
    planned_world_size,
    resolve_runtime,
)
from skinlesion.data.datasets import LabelledSet
from skinlesion.evaluation.report import write_oof_report
from skinlesion.training.checks import check_config, check_world_size, load_checked_data
from skinlesion.training.fit_familiarity import fit_run_familiarity
from skinlesion.training.fold import fit_fold
from skinlesion.training.probe import run_linear_probe
from skinlesion.training.run_data import (
    RunData,
    load_run_data,
)
from skinlesion.training.tracking import Tracker, open_tracker

log = logging.getLogger(__name__)


def setup_logging(run_dir: Path | None, is_main: bool = True) -> logging.Handler | None:
    """Console logging, plus ``train.log`` in the run folder on the main process.

    Returns the file handler, which the caller removes when the run ends. A root level of DEBUG
    (``--verbose``) is kept.
    """
    root = logging.getLogger()
    if root.level != logging.DEBUG or not is_main:
        root.setLevel(logging.INFO if is_main else logging.WARNING)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not any(
        isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
        for h in root.handlers
    ):
        h = logging.StreamHandler()
        h.setFormatter(fmt)
        root.addHandler(h)
    if run_dir is not None and is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(RunFolder(run_dir).train_log)
        fh.setFormatter(fmt)
        root.addHandler(fh)
        return fh
    return None


def check_resume_target(run_dir: Path, resume: bool) -> None:
    """``--resume`` continues a run: a folder without one is a mistyped ``output_dir``, which must
    not start hours of training from scratch."""
    if not resume or RunFolder(run_dir).config.is_file():
        return
    found = "holds no run (no config.yaml)" if run_dir.exists() else "does not exist"
    raise ConfigError(
        f"output_dir: {run_dir} {found}; --resume continues a run there: check the path, or "
        f"drop --resume to start a new one"
    )


def check_resume(run_dir: Path, cfg: Config, resume: bool) -> Config:
    """Refuse to mix runs: a folder with results needs --resume, and --resume may change only
    the keys that do not decide what is trained; the config to save in the run folder."""
    run = RunFolder(run_dir)
    if not run.config.is_file():
        return cfg
    if not resume and run.has_results():
        raise ConfigError(
            f"output_dir: {run_dir} already holds a run; pass --resume to continue it, "
            f"or choose another output_dir"
        )
    if not resume:
        return cfg
    saved = check_resume_config(run.config, cfg)
    # The folder holds the folds of both parts: its config says so.
    merged = cfg.model_copy(deep=True)
    old, new = saved.cv.folds_to_run, cfg.cv.folds_to_run
    merged.cv.folds_to_run = None if old is None or new is None else sorted({*old, *new})
    return merged


def run_cv(cfg: Config, resume: bool = False, progress: bool = True) -> Path:
    """Train every fold of ``cv.folds_to_run``; write the run folder and its OOF report.

    Names and paths are checked first (:func:`~skinlesion.training.checks.check_config`), that
    the run fits torchrun's processes, that ``resume`` finds a run to continue, and the labelled
    data is read and checked: a typo fails before any folder, fold or cache entry exists.
    """
    check_config(cfg)
    check_world_size(cfg, planned_world_size())
    run_dir = Path(cfg.output_dir)
    check_resume_target(run_dir, resume)  # every rank: none may wait for a main that failed
    labelled = load_checked_data(cfg)
    dist_info = init_distributed()
    saved = check_resume(run_dir, cfg, resume) if dist_info.is_main else cfg
    handler = setup_logging(run_dir, dist_info.is_main)
    try:
        _run_cv(cfg, saved, run_dir, dist_info, resume, progress, labelled)
    finally:
        if handler is not None:
            logging.getLogger().removeHandler(handler)
            handler.close()
        if dist_info.enabled and dist.is_initialized():
            dist.destroy_process_group()
    return run_dir


def _shared_data(
    cfg: Config, run: RunFolder, dist_info: DistInfo, progress: bool, labelled: LabelledSet
) -> RunData:
    """The main process builds the image cache first; the others then find it ready."""
    if dist_info.is_main:
        data = load_run_data(cfg, run.folds, progress=progress, labelled=labelled)
    if dist_info.enabled:
        dist.barrier()
    if not dist_info.is_main:
        data = load_run_data(cfg, None, progress=False, labelled=labelled)
    return data


def _folds_to_run(cfg: Config, data: RunData) -> list[int]:
    """The models to train: folds of the table, or one per held-out site (cross-site)."""
    if data.holdout is not None:
        present = list(range(len(data.holdout)))
        what = "models (one per site of cv.holdout: " + ", ".join(data.holdout) + ")"
    else:
        present = sorted(set(data.table["fold"].tolist()))
        what = "folds"
    folds = cfg.cv.folds_to_run if cfg.cv.folds_to_run is not None else present
    unknown = [f for f in folds if f not in present]
    if unknown:
        raise ConfigError(f"cv.folds_to_run names folds {unknown}; the {what} are {present}")
    return folds


def _run_cv(
    cfg: Config,
    saved: Config,
    run_dir: Path,
    dist_info: DistInfo,
    resume: bool,
    progress: bool,
    labelled: LabelledSet,
) -> None:
    """Train ``cfg``'s folds; ``saved`` is the config the run folder records."""
    runtime = resolve_runtime(cfg.train.device, cfg.train.amp, cfg.train.channels_last, dist_info)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    run = RunFolder(run_dir)
    if dist_info.is_main:
        save_config(saved, run.config)
        run.environment.write_text(json.dumps(environment_info(runtime), indent=2))
    data = _shared_data(cfg, run, dist_info, progress, labelled)
    if dist_info.is_main:
        run.dataset.write_text(json.dumps(data.dataset, indent=2))
    if runtime.device.type == "cuda":
        # The whole uint8 cache lives on the GPU (HAM10000 at 300 px: ~2.7 GB).
        data.images = torch.from_numpy(np.ascontiguousarray(data.images)).to(runtime.device)
    folds = _folds_to_run(cfg, data)
    tracker = open_tracker(saved, run, dist_info.is_main, resume)
    try:
        _train_folds(cfg, data, run_dir, runtime, folds, resume, progress, tracker)
    except BaseException:
        tracker.close(failed=True)
        raise
    tracker.close()
    if dist_info.enabled:
        dist.barrier()


def _train_folds(
    cfg: Config,
    data: RunData,
    run_dir: Path,
    runtime: Runtime,
    folds: list[int],
    resume: bool,
    progress: bool,
    tracker: Tracker,
) -> None:
    """Every fold, then (main process) familiarity and the out-of-fold report."""
    is_main = runtime.dist.is_main
    if cfg.train.scheme == "linear_probe":
        run_linear_probe(cfg, data, run_dir, runtime, folds, resume, progress, tracker)
    else:
        for fold in folds:
            fit_fold(cfg, data, fold, run_dir, runtime, resume, progress, tracker)
        # Each fold's familiarity.safetensors (refer: unlike the training images).
        if is_main and cfg.eval.familiarity:
            fit_run_familiarity(run_dir, cfg, data, runtime, progress, strict=False)
    if is_main:
        write_oof_report(run_dir, n_boot=cfg.eval.n_boot)
        tracker.end_run()
