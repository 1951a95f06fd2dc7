"""Experiment tracking: TensorBoard event files per fold and, given ``tracking.mlflow_uri``, an
MLflow run per fold under a parent run for the whole cross-validation.

Training calls a :class:`Tracker` at three points (an epoch's metrics row, a finished fold, the
finished run); :func:`open_tracker` builds the one a config asks for. A tracker that fails (a
server that is down, a full disk) is reported by one warning and dropped: tracking never costs
a training run. Only the main process of a distributed run logs.

    tracker = open_tracker(cfg, RunFolder(run_dir), is_main=True, resume=False)
    tracker.log_epoch(0, {"epoch": 1, "train_loss": 0.9, "val_loss": 1.1, ...})
    tracker.end_fold(0, best_epoch, confusion, classes)
    tracker.end_run()
    tracker.close()
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

from skinlesion.core.config import Config, config_to_dict
from skinlesion.core.run_folder import RunFolder, config_leaves
from skinlesion.evaluation.calibration import softmax
from skinlesion.evaluation.metrics import point_metrics
from skinlesion.evaluation.plots import confusion_figure

log = logging.getLogger(__name__)

# Columns of metrics.csv that are not metrics.
_NOT_METRICS = ("epoch",)
# MLflow's limits: 100 params a batch, a param value of 6000 characters.
_PARAM_BATCH = 100
_PARAM_CHARS = 6000
# A server that does not answer costs seconds, not MLflow's default minutes of retries; a user's
# own values of these variables win.
_MLFLOW_HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
_PROBE_SECONDS = 3.0


def epoch_metrics(row: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a metrics row, by column name, without the epoch itself."""
    out = {}
    for key, value in row.items():
        if key in _NOT_METRICS or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if math.isfinite(value):
            out[key] = float(value)
    return out


class Tracker:
    """What training tells a tracker; this base class records nothing (tracking off)."""

    name = "none"

    def log_epoch(self, fold: int, row: dict[str, Any]) -> None:
        """One epoch's metrics row of ``fold`` (step: ``row["epoch"]``)."""

    def end_fold(
        self, fold: int, step: int, confusion: np.ndarray, classes: Sequence[str], folder: Path
    ) -> None:
        """The fold is done: its kept model's validation ``confusion`` (rows true) at ``step``,
        its folder's files."""

    def end_run(self) -> None:
        """The run's report is written."""

    def close(self, failed: bool = False) -> None:
        """Release files and connections; ``failed``: training stopped on an error."""

    def abandon(self) -> None:
        """Let go after a failure of this tracker: no call that could fail (or wait) again."""
        self.close(failed=True)


class TensorBoardTracker(Tracker):
    """Event files in ``fold_K/tensorboard/``; a resumed fold adds a new events file there."""

    name = "TensorBoard"

    def __init__(self, run: RunFolder) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._writer_class = SummaryWriter
        self._run = run
        self._writers: dict[int, Any] = {}

    def _writer(self, fold: int) -> Any:
        if fold not in self._writers:
            path = self._run.fold(fold).tensorboard
            self._writers[fold] = self._writer_class(log_dir=str(path))
        return self._writers[fold]

    def log_epoch(self, fold: int, row: dict[str, Any]) -> None:
        writer = self._writer(fold)
        for key, value in epoch_metrics(row).items():
            writer.add_scalar(key, value, global_step=int(row["epoch"]))
        writer.flush()  # an interrupted run keeps the epochs that metrics.csv keeps

    def end_fold(
        self, fold: int, step: int, confusion: np.ndarray, classes: Sequence[str], folder: Path
    ) -> None:
        writer = self._writer(fold)
        writer.add_figure("confusion_matrix", confusion_figure(confusion, classes), step)
        writer.close()
        del self._writers[fold]

    def close(self, failed: bool = False) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()


def _mlflow_client(uri: str) -> Any:
    for key, value in _MLFLOW_HTTP_ENV.items():
        os.environ.setdefault(key, value)
    if urlparse(uri).scheme in ("", "file"):
        # MLflow 3 refuses a file store unless asked; naming one in the config is asking.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def check_server(uri: str, timeout: float = _PROBE_SECONDS) -> None:
    """Raise :class:`OSError` when an ``http(s)`` URI's host does not accept a connection within
    ``timeout`` seconds; other URIs are left to MLflow."""
    parts = urlparse(uri)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return
    port = parts.port or (443 if parts.scheme == "https" else 80)
    with socket.create_connection((parts.hostname, port), timeout=timeout):
        pass


def _artifact_location(uri: str) -> str | None:
    """For a local ``sqlite:`` store, artifacts beside the database, not in the working folder."""
    parts = urlparse(uri)
    if parts.scheme != "sqlite" or not parts.path.startswith("/"):
        return None
    path = parts.path[1:] if parts.path.startswith("//") else parts.path
    return (Path(path).parent / "mlartifacts").as_uri() if path else None


def config_params(cfg: Config) -> dict[str, str]:
    """The resolved config as MLflow params (``train.lr``: ``0.0003``); the tracking URI is left
    out, since it may carry credentials."""
    leaves = config_leaves(config_to_dict(cfg))
    leaves.pop("tracking.mlflow_uri", None)
    return {k: str(v)[:_PARAM_CHARS] for k, v in leaves.items()}


class MLflowTracker(Tracker):
    """A parent run for the run folder and a child run per fold, their ids kept in
    ``tracking.json`` so that ``--resume`` continues the same runs."""

    name = "MLflow"

    def __init__(self, cfg: Config, run: RunFolder, resume: bool) -> None:
        uri = cfg.tracking.mlflow_uri
        assert uri is not None
        check_server(uri)
        self._client = _mlflow_client(uri)
        self._run = run
        self._params = config_params(cfg)
        saved = json.loads(run.tracking.read_text()) if resume and run.tracking.is_file() else {}
        same = saved.get("mlflow_uri") == uri and saved.get("experiment") == (
            cfg.tracking.mlflow_experiment
        )
        self._ids: dict[str, Any] = saved if same else {"folds": {}}
        self._ids.update(mlflow_uri=uri, experiment=cfg.tracking.mlflow_experiment)
        if "parent" in self._ids:
            self._client.update_run(self._ids["parent"], status="RUNNING")
        else:
            self._ids["experiment_id"] = self._experiment_id(uri, cfg.tracking.mlflow_experiment)
            self._ids["parent"] = self._new_run(run.root.name, {})
        self._save_ids()

    def _experiment_id(self, uri: str, name: str) -> str:
        found = self._client.get_experiment_by_name(name)
        if found is not None:
            return str(found.experiment_id)
        return str(self._client.create_experiment(name, artifact_location=_artifact_location(uri)))

    def _new_run(self, run_name: str, tags: dict[str, str]) -> str:
        from mlflow.entities import Param

        created = self._client.create_run(
            self._ids["experiment_id"], run_name=run_name, tags={**tags, "skinlesion.run": run_name}
        )
        run_id = str(created.info.run_id)
        params = [Param(k, v) for k, v in self._params.items()]
        for i in range(0, len(params), _PARAM_BATCH):
            self._client.log_batch(run_id, params=params[i : i + _PARAM_BATCH])
        return run_id

    def _save_ids(self) -> None:
        self._run.tracking.write_text(json.dumps(self._ids, indent=2))

    def _fold_run(self, fold: int) -> str:
        folds = self._ids["folds"]
        if str(fold) not in folds:
            tags = {"mlflow.parentRunId": self._ids["parent"]}
            folds[str(fold)] = self._new_run(f"fold_{fold}", tags)
            self._save_ids()
        return str(folds[str(fold)])

    def log_epoch(self, fold: int, row: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        step, now = int(row["epoch"]), _millis()
        metrics = [Metric(k, v, now, step) for k, v in epoch_metrics(row).items()]
        self._client.log_batch(self._fold_run(fold), metrics=metrics)

    def end_fold(
        self, fold: int, step: int, confusion: np.ndarray, classes: Sequence[str], folder: Path
    ) -> None:
        run_id = self._fold_run(fold)
        figure = confusion_figure(confusion, classes)
        self._client.log_figure(run_id, figure, "confusion_matrix.png")
        for path in (folder / "metrics.csv", folder / "summary.json"):
            if path.is_file():
                self._client.log_artifact(run_id, str(path))
        self._client.set_terminated(run_id)

    def end_run(self) -> None:
        parent, run = self._ids["parent"], self._run
        for path in (run.report, run.oof_metrics, run.config, run.root / "MODEL_CARD.md"):
            if path.is_file():
                self._client.log_artifact(parent, str(path))
        if run.plots.is_dir():
            self._client.log_artifacts(parent, str(run.plots), "plots")
        self._log_oof_metrics(parent)

    def _log_oof_metrics(self, parent: str) -> None:
        from mlflow.entities import Metric

        if not self._run.oof_metrics.is_file():
            return
        point = json.loads(self._run.oof_metrics.read_text()).get("point", {})
        values = epoch_metrics({f"oof_{k}": v for k, v in point.items()})
        now = _millis()
        self._client.log_batch(parent, metrics=[Metric(k, v, now, 0) for k, v in values.items()])

    def abandon(self) -> None:
        pass  # a server that failed once is not asked again

    def close(self, failed: bool = False) -> None:
        status = "FAILED" if failed else "FINISHED"
        for run_id in [self._ids["parent"], *self._ids["folds"].values()]:
            self._client.set_terminated(run_id, status=status)


def _millis() -> int:
    import time

    return int(time.time() * 1000)


class Trackers(Tracker):
    """Several trackers as one: the first failure of each is one warning, and it is dropped."""

    def __init__(self, trackers: Sequence[Tracker]) -> None:
        self.trackers = list(trackers)

    def _each(self, method: str, *args: Any, **kwargs: Any) -> None:
        for tracker in list(self.trackers):
            try:
                getattr(tracker, method)(*args, **kwargs)
            except Exception as err:  # noqa: BLE001 - tracking never stops training
                _warn_dropped(tracker.name, err)
                self.trackers.remove(tracker)
                if method != "close":
                    _abandon_quietly(tracker)

    def log_epoch(self, fold: int, row: dict[str, Any]) -> None:
        self._each("log_epoch", fold, row)

    def end_fold(
        self, fold: int, step: int, confusion: np.ndarray, classes: Sequence[str], folder: Path
    ) -> None:
        self._each("end_fold", fold, step, confusion, classes, folder)

    def end_run(self) -> None:
        self._each("end_run")

    def close(self, failed: bool = False) -> None:
        self._each("close", failed)
        self.trackers.clear()


def end_fold_tracking(
    tracker: Tracker | None,
    summary: dict[str, Any],
    y: np.ndarray,
    logits: np.ndarray,
    classes: Sequence[str],
    folder: Path,
) -> None:
    """Tell ``tracker`` a fold is done, with the confusion matrix of its kept model's
    validation ``logits`` (at its best epoch)."""
    if tracker is None:
        return
    confusion = np.asarray(point_metrics(y, softmax(logits), classes=classes)["confusion_matrix"])
    tracker.end_fold(int(summary["fold"]), int(summary["best_epoch"]), confusion, classes, folder)


def _warn_dropped(name: str, err: BaseException) -> None:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    log.warning("tracking: %s failed (%s); training goes on without it", name, first[:300])


def _abandon_quietly(tracker: Tracker) -> None:
    with contextlib.suppress(Exception):  # already reported once
        tracker.abandon()


def open_tracker(cfg: Config, run: RunFolder, is_main: bool, resume: bool) -> Tracker:
    """The trackers ``cfg.tracking`` asks for, on the main process; a no-op elsewhere. One that
    cannot start is one warning, and the run goes on without it."""
    if not is_main:
        return Tracker()
    wanted: list[tuple[str, Any]] = []
    if cfg.tracking.tensorboard:
        wanted.append(("TensorBoard", lambda: TensorBoardTracker(run)))
    if cfg.tracking.mlflow_uri is not None:
        wanted.append(("MLflow", lambda: MLflowTracker(cfg, run, resume)))
    started: list[Tracker] = []
    for name, start in wanted:
        try:
            started.append(start())
        except Exception as err:  # noqa: BLE001 - tracking never stops training
            _warn_dropped(f"{name} ({_where(cfg, name)})", err)
    return Trackers(started)


def _where(cfg: Config, name: str) -> str:
    return str(cfg.tracking.mlflow_uri) if name == "MLflow" else "fold_K/tensorboard"
