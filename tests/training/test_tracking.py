"""Experiment tracking: TensorBoard events and MLflow runs read back with their own readers."""

from __future__ import annotations

import json
import logging
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from conftest import FINETUNE, crash_on_call, run_overrides, train_cli

from skinlesion.core.config import load_config
from skinlesion.core.errors import ConfigError
from skinlesion.core.run_folder import RunFolder
from skinlesion.training import checks
from skinlesion.training.checks import check_tracking_packages
from skinlesion.training.tracking import (
    MLflowTracker,
    Tracker,
    Trackers,
    check_server,
    config_params,
    end_fold_tracking,
)

mlflow = pytest.importorskip("mlflow")
event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

SCALARS = {"train_loss", "val_loss", "val_balanced_accuracy", "val_macro_auroc", "lr"}
# Two short epochs of two folds: seconds on a CPU.
TINY = {**FINETUNE, "train.epochs": 3, "train.steps_per_epoch": 2}


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _events(folder: Path) -> Any:
    # purge_orphaned_data=False keeps a step logged twice visible instead of dropping one.
    acc = event_accumulator.EventAccumulator(
        str(folder), size_guidance={"scalars": 0, "images": 0}, purge_orphaned_data=False
    )
    acc.Reload()
    return acc


class Recorder(Tracker):
    name = "recorder"

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.fail = fail

    def log_epoch(self, fold: int, row: dict[str, Any]) -> None:
        if self.fail:
            raise ConnectionError("no route to host\nsecond line")
        self.calls.append(("log_epoch", (fold, row["epoch"])))

    def end_fold(self, fold: int, step: int, confusion: Any, classes: Any, folder: Path) -> None:
        self.calls.append(("end_fold", (fold, step, np.asarray(confusion), list(classes))))


def test_end_fold_confusion_counts_argmax_against_labels() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 40)
    logits = rng.normal(size=(40, 3)) + 1.5 * np.eye(3)[y]  # right often, not always
    rec = Recorder()
    end_fold_tracking(rec, {"fold": 1, "best_epoch": 4}, y, logits, ["a", "b", "c"], Path("."))
    (_, (fold, step, confusion, classes)) = rec.calls[0]
    expected = pd.crosstab(y, logits.argmax(1)).reindex(index=range(3), columns=range(3))
    assert (fold, step, classes) == (1, 4, ["a", "b", "c"])
    np.testing.assert_array_equal(confusion, expected.fillna(0).to_numpy())
    assert 0 < np.trace(confusion) < 40


def test_a_failing_tracker_warns_once_and_the_others_go_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    good, bad = Recorder(), Recorder(fail=True)
    trackers = Trackers([bad, good])
    with caplog.at_level(logging.WARNING, logger="skinlesion.training.tracking"):
        for epoch in (1, 2, 3):
            trackers.log_epoch(0, {"epoch": epoch, "val_loss": 1.0})
        trackers.close()
    warnings = [r.getMessage() for r in caplog.records if r.name.endswith("tracking")]
    assert warnings == ["tracking: recorder failed (no route to host); training goes on without it"]
    assert good.calls == [("log_epoch", (0, 1)), ("log_epoch", (0, 2)), ("log_epoch", (0, 3))]


def test_closed_port_is_refused_in_seconds() -> None:
    t0 = time.perf_counter()
    with pytest.raises(OSError):
        check_server(f"http://127.0.0.1:{_closed_port()}")
    assert time.perf_counter() - t0 < 5
    check_server("sqlite:///nowhere/mlflow.db")  # not a server: left to MLflow


def test_params_are_the_resolved_config_without_the_uri() -> None:
    cfg = load_config(None, ["train.lr=0.001", "tracking.mlflow_uri=https://u:secret@host"])
    params = config_params(cfg)
    assert params["train.lr"] == "0.001" and params["cv.n_folds"] == "5"
    assert "tracking.mlflow_uri" not in params and "secret" not in "".join(params.values())


@pytest.mark.parametrize(
    ("overrides", "missing", "key"),
    [
        (["tracking.mlflow_uri=http://h:5000"], "mlflow", "tracking.mlflow_uri"),
        (["tracking.mlflow_uri=sqlite:///m.db"], "alembic", "tracking.mlflow_uri"),
        ([], "tensorboard", "tracking.tensorboard"),
    ],
)
def test_a_missing_tracking_package_fails_before_any_work(
    overrides: list[str], missing: str, key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = load_config(None, overrides)
    check_tracking_packages(cfg)  # all installed here
    monkeypatch.setattr(checks, "_installed", lambda name: name != missing)
    with pytest.raises(ConfigError, match=rf"^{key}: needs {missing}, not installed; pip"):
        check_tracking_packages(cfg)
    check_tracking_packages(load_config(None, ["tracking.tensorboard=false"]))


def test_sqlite_store_holds_parent_child_metrics_and_params(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = RunFolder(tmp_path / "run")
    run.fold(0).root.mkdir(parents=True)
    (run.fold(0).root / "metrics.csv").write_text("epoch\n1\n")
    cfg = load_config(None, [f"tracking.mlflow_uri={uri}", "train.lr=0.002"])
    tracker = MLflowTracker(cfg, run, resume=False)
    for epoch, loss in ((1, 0.9), (2, 0.7)):
        tracker.log_epoch(0, {"epoch": epoch, "val_loss": loss, "val_macro_auroc": None})
    tracker.end_fold(0, 2, np.eye(2, dtype=int), ["x", "y"], run.fold(0).root)
    tracker.close()
    ids = json.loads(run.tracking.read_text())
    client = mlflow.MlflowClient(tracking_uri=uri)
    child = client.get_run(ids["folds"]["0"])
    assert child.data.tags["mlflow.parentRunId"] == ids["parent"]
    assert child.data.params["train.lr"] == "0.002"
    history = client.get_metric_history(child.info.run_id, "val_loss")
    assert [(m.step, m.value) for m in history] == [(1, 0.9), (2, 0.7)]
    assert "val_macro_auroc" not in child.data.metrics  # undefined, not logged as 0
    assert {a.path for a in client.list_artifacts(child.info.run_id)} == {
        "confusion_matrix.png",
        "metrics.csv",
    }
    assert client.get_run(ids["parent"]).info.status == "FINISHED"
    assert (tmp_path / "mlartifacts").is_dir()  # beside the database, not in the working folder


def test_resumed_run_logs_every_epoch_once_to_tensorboard_and_mlflow(
    syn_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # anything written outside the run would show up here
    store = tmp_path / "mlruns"
    extra = {"tracking.mlflow_uri": store.as_uri(), "tracking.mlflow_experiment": "tiny"}
    out = tmp_path / "run"
    args = run_overrides(TINY, syn_root, out, tmp_path / "cache", **extra)
    undo = crash_on_call(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        train_cli(args)
    undo()
    ids = json.loads((out / "tracking.json").read_text())
    assert train_cli(["--resume", *args]) == 0
    assert json.loads((out / "tracking.json").read_text())["folds"]["0"] == ids["folds"]["0"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "mlruns", "run"]

    for fold in (0, 1):
        metrics = pd.read_csv(out / f"fold_{fold}" / "metrics.csv")
        acc = _events(out / f"fold_{fold}" / "tensorboard")
        assert set(acc.Tags()["scalars"]) >= SCALARS
        loss = acc.Scalars("val_loss")
        assert [e.step for e in loss] == [1, 2, 3]  # resumed fold 0: no step twice
        np.testing.assert_allclose([e.value for e in loss], metrics["val_loss"], rtol=1e-6)
        best = json.loads((out / f"fold_{fold}" / "summary.json").read_text())["best_epoch"]
        assert [e.step for e in acc.Images("confusion_matrix")] == [best]
    assert len(list((out / "fold_0" / "tensorboard").glob("events.out.tfevents.*"))) == 2

    client = mlflow.MlflowClient(tracking_uri=store.as_uri())
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert [r.info.run_id for r in parents] == [ids["parent"]]
    children = {r.info.run_name: r for r in runs if r not in parents}
    assert sorted(children) == ["fold_0", "fold_1"]
    for name, child in children.items():
        assert child.data.tags["mlflow.parentRunId"] == ids["parent"]
        assert child.data.params["train.lr"] == "0.0003"
        history = client.get_metric_history(child.info.run_id, "val_balanced_accuracy")
        assert sorted(m.step for m in history) == [1, 2, 3], name
        assert child.info.status == "FINISHED"
    parent_files = {a.path for a in client.list_artifacts(ids["parent"])}
    assert {"report.md", "plots", "oof_metrics.json", "config.yaml"} <= parent_files
    assert client.list_artifacts(ids["parent"], "plots")
    assert "oof_balanced_accuracy" in client.get_run(ids["parent"]).data.metrics


def test_tracking_off_and_a_down_server_cost_nothing_but_one_warning(
    syn_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "run"
    uri = f"http://127.0.0.1:{_closed_port()}"
    extra = {"cv.folds_to_run": "[0]", "train.epochs": 2, "tracking.tensorboard": "false"}
    args = run_overrides(TINY, syn_root, out, tmp_path / "cache", **extra)
    t0 = time.perf_counter()
    with caplog.at_level(logging.WARNING):
        assert train_cli([*args, f"tracking.mlflow_uri={uri}"]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.name.endswith("tracking")]
    assert len(warnings) == 1 and f"MLflow ({uri}) failed" in warnings[0], warnings
    assert (out / "report.md").is_file() and (out / "fold_0" / "summary.json").is_file()
    assert not list(out.rglob("tensorboard")) and not (out / "tracking.json").exists()
    assert time.perf_counter() - t0 < 120
