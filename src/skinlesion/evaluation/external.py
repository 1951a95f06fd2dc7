"""External validation: a trained run on any labelled image set from another site or device.

Labels come as a CSV with ``image_id`` and ``dx`` (the model's class names, from its spec, or
another vocabulary mapped with ``--label-map``); images are
``DIR/<image_id>.<jpg|jpeg|png|bmp>``. The melanoma threshold and the confidence reference are
taken unchanged from the run's out-of-fold report, so the external numbers answer "how does the
model as shipped do here?". So are the refer rules: the report gives the share referred, overall
and by reason ("unlike the training images" among them), and the AUROC of the images'
unfamiliarity against the model's held-out in-distribution scores.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from skinlesion.core.errors import ConfigError, DataError
from skinlesion.core.labels import class_index
from skinlesion.core.paths import check_writable_dir
from skinlesion.core.runtime import resolve_runtime
from skinlesion.data.labelled_table import (
    FolderImages,
    apply_label_map,
    attach_images,
    check_columns,
    duplicate_images,
    image_id_of,
    keep_rows,
    number_lines,
    read_table,
    strip,
    unknown_labels,
)
from skinlesion.data.tabular import METADATA_FIELDS, age_problems, metadata_lookalike
from skinlesion.evaluation.metrics import evaluate_predictions
from skinlesion.evaluation.prediction_files import (
    EVALUATION_PREDICTIONS,
    labelled_predictions,
    read_predictions,
    write_predictions,
)
from skinlesion.evaluation.refer_figures import plot_risk_coverage, refer_figures, risk_coverage
from skinlesion.evaluation.report import confidence_indicators, render_markdown, write_plots
from skinlesion.inference.onnx_model import OnnxModel
from skinlesion.inference.refer import refer_rules
from skinlesion.inference.resolve import Predictor, resolve_model

log = logging.getLogger(__name__)


def read_label_map(path: Path) -> dict[str, str]:
    """A YAML mapping or a two-column CSV ``from,to``; a target of ``drop`` removes the image."""
    if path.suffix in (".yaml", ".yml"):
        mapping = yaml.safe_load(path.read_text())
        if not isinstance(mapping, dict):
            raise DataError(f"{path}: label map", ["expected a mapping from label to dx code"])
        return {str(k).strip(): "" if v is None else str(v).strip() for k, v in mapping.items()}
    table = read_table(path)
    if list(table.columns[:2]) != ["from", "to"]:
        raise DataError(
            f"{path}: label map", [f"expected columns from,to; found {list(table.columns)}"]
        )
    return {str(a).strip(): str(b).strip() for a, b in zip(table["from"], table["to"], strict=True)}


def load_labels(
    labels_csv: Path,
    images_dir: Path,
    label_map: dict[str, str] | None = None,
    where: Mapping[str, str | Sequence[str]] | None = None,
    *,
    classes: Sequence[str],
) -> pd.DataFrame:
    """Labels with ``label`` (index in the model's ``classes``), ``path`` and ``source`` (the
    file's stem), through :mod:`skinlesion.data.labelled_table`'s steps; every problem reported
    at once.

    ``where`` keeps only rows whose columns hold the given values (e.g. ``{"split": "test"}``).
    """
    name = str(labels_csv)
    df = read_table(labels_csv)
    check_columns(df, ["image_id", "dx", *(where or {})], name, "expected image_id, dx")
    df = keep_rows(number_lines(df), where, name, "--where")
    df = strip(df, ["image_id", "dx"])
    if label_map:
        df = apply_label_map(df, label_map, classes)
    problems = unknown_labels(df, classes, name, "" if label_map else " (use --label-map)")
    problems += duplicate_images(df, name)
    # The same lookup as a training set's (data.format csv): an id finds ID.jpg/.png/... in
    # the folder, a value with an extension is a path relative to it.
    df, missing_images = attach_images(
        df.assign(image=df["image_id"]), FolderImages(images_dir), name, verify=True
    )
    problems += missing_images
    df = df.assign(image_id=df["image"].map(image_id_of)).drop(columns=["image"])
    if problems:
        raise DataError(f"{labels_csv}: cannot evaluate", problems)
    df = df.assign(label=df["dx"].map(class_index(classes)), source=labels_csv.stem)
    return df.reset_index(drop=True)


def _write_predictions(
    labels: pd.DataFrame,
    probs: np.ndarray,
    classes: Sequence[str],
    output: Path,
    unfamiliarity: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``predictions.csv`` (with ``unfamiliarity`` for a model that has a familiarity); the
    labels and probabilities read back from it (figures from the file, so anyone can recompute
    them). ``source`` (the labels file's stem) follows ``dx``, as in a run's predictions."""
    output.mkdir(parents=True, exist_ok=True)
    keys = [c for c in ("image_id", "lesion_id", "dx", "source") if c in labels.columns]
    preds = labelled_predictions(labels[keys], probs, classes, unfamiliarity=unfamiliarity)
    write_predictions(preds, output / EVALUATION_PREDICTIONS)
    saved = read_predictions(output / EVALUATION_PREDICTIONS)
    return saved.labels(), saved.probabilities()


def _metadata(
    labels: pd.DataFrame, loaded: Predictor, use: bool | None, where: str
) -> tuple[pd.DataFrame | None, list[str] | str]:
    """The labels' metadata columns for a fused model, and what the report says was used.

    A labels file may hold any other column (``split``, a hospital), so an unknown one is not an
    error as in a metadata table; one that looks like a field the file lacks (``site``,
    ``Age``) is named in a warning. An age that is not one is a :class:`DataError` naming the
    file, line and image. An export folder's graph takes images only: the labels' columns are
    left out, said in the log, and ``use=True`` (metadata asked for) is a :class:`ConfigError`."""
    if isinstance(loaded, OnnxModel):
        if use:
            raise ConfigError(
                f"use_metadata=True: {loaded.origin} is an ONNX export, whose graph takes images "
                f"only; evaluate the model it was exported from ({loaded.name}) for metadata"
            )
        present = [f for f in METADATA_FIELDS if f in labels.columns] if use is None else []
        if present:
            log.info("%s: columns %s not used: an ONNX graph takes images only", where, present)
        return None, "not used: the ONNX graph takes images only"
    if not loaded.uses_metadata:
        return None, "not used: the model takes images only"
    use = use is not False
    fields = [f for f in METADATA_FIELDS if f in labels.columns] if use else []
    for column in labels.columns if use else []:
        field = metadata_lookalike(str(column)) if column not in METADATA_FIELDS else None
        if field is not None and field not in fields:
            log.warning(
                "%s: column %r is not read as %s (the model reads columns named %s); rename it "
                "to give the model that field",
                where,
                column,
                field,
                ", ".join(METADATA_FIELDS),
            )
    if "age" in fields:  # named as predict --metadata names them, not by row position
        problems = age_problems(labels["age"].tolist(), labels["line"].tolist(), labels["image_id"])
        if problems:
            raise DataError(f"{where}: invalid metadata", problems)
    return (labels[fields] if fields else None), fields


def _refer_results(
    y: np.ndarray, p: np.ndarray, unfamiliarity: np.ndarray | None, loaded: Predictor
) -> dict[str, Any]:
    """Accuracy on the accepted images against the share referred (at the model's own rules
    too), the share referred by reason, and the unfamiliarity's AUROC against training."""
    rules = refer_rules(loaded.reference)
    return {
        "risk_coverage": risk_coverage(y, p, rules, unfamiliarity=unfamiliarity),
        **refer_figures(p, rules, unfamiliarity, loaded.heldout_unfamiliarity()),
    }


def reference_domain(probs: np.ndarray, reference: dict[str, Any] | None) -> dict[str, Any]:
    """Confidence indicators of ``probs`` at the reference's confidence threshold (0.5 without
    one), with the out-of-fold reference figures the reference has (a model packaged from a run
    without an out-of-fold report has none, or only some)."""
    ref = (reference or {}).get("domain") or {}
    domain = confidence_indicators(probs, float(ref.get("confidence_threshold", 0.5)))
    keys = ("mean_max_probability", "share_below_threshold")
    if all(k in ref for k in keys):
        domain["reference"] = {k: ref[k] for k in keys}
    return domain


def evaluate_external(
    model: str | Path | None,
    labels_csv: str | Path,
    images_dir: str | Path,
    output: str | Path,
    tta: int | None = None,
    label_map: str | Path | None = None,
    batch_size: int = 32,
    device: str = "auto",
    n_boot: int = 1000,
    where: dict[str, str] | None = None,
    progress: bool = True,
    use_metadata: bool | None = None,
    backend: str = "auto",
    detail: str | None = None,
) -> dict[str, Any]:
    """Predict a labelled set with any model :func:`resolve_model` takes; write
    ``predictions.csv``, ``metrics.json``, plots, report. A fused model takes metadata from the
    labels' ``age``, ``sex``, ``localization`` columns (those present); ``use_metadata=False``
    gives it images only, ``True`` refuses a model that cannot take any (an export folder).
    ``backend``: see :mod:`skinlesion.inference.backend`; ``detail``:
    :func:`~skinlesion.inference.resolve.set_detail`."""
    output = Path(output)
    check_writable_dir(output, "--output")
    mapping = read_label_map(Path(label_map)) if label_map else None
    runtime = resolve_runtime(device)
    loaded = resolve_model(model, runtime, backend, tta, detail)
    classes = loaded.class_names
    labels = load_labels(Path(labels_csv), Path(images_dir), mapping, where, classes=classes)
    tta = loaded.tta if tta is None else tta
    metadata, used = _metadata(labels, loaded, use_metadata, str(labels_csv))
    unseen = loaded.unseen_metadata(metadata, str(labels_csv)) if metadata is not None else {}
    out = loaded.predictions(labels["path"].tolist(), tta, batch_size, progress, metadata)
    if out.errors:
        raise DataError("images failed to decode", list(out.errors.values()))
    y, p = _write_predictions(labels, out.probs, classes, output, out.unfamiliarity)
    threshold = loaded.reference.get("mel_threshold") if loaded.reference else None
    groups = labels["lesion_id"].to_numpy() if "lesion_id" in labels.columns else None
    metrics = evaluate_predictions(
        y, p, groups, classes=classes, mel_threshold=threshold, n_boot=n_boot
    )
    result = {
        "source": str(labels_csv),
        "filter": where or {},
        "model": str(loaded.origin),
        "tta": tta,
        "backend": ", ".join(sorted(loaded.engines_used)) or loaded.backend,  # what ran
        "metadata": used,
        "detail": _detail_label(loaded),
        "metadata_unseen": unseen,
        "mel_threshold": threshold,
        "mel_threshold_rule": "taken unchanged from the run's out-of-fold report"
        if threshold is not None
        else "none (no out-of-fold report found)",
        "domain": reference_domain(p, loaded.reference),
        **metrics,
    }
    result.update(_refer_results(y, p, out.unfamiliarity, loaded))
    _write_report(result, y, p, classes, output, f"External evaluation: {labels_csv}")
    return result


def _detail_label(loaded: Predictor) -> str:
    """What larger images were reduced to: the model's detail, or "as they came"."""
    detail = loaded.specs[0].detail
    return detail.label() if detail is not None else "none (images as they came)"


def _write_report(
    result: dict[str, Any],
    y: np.ndarray,
    p: np.ndarray,
    classes: Sequence[str],
    output: Path,
    title: str,
) -> None:
    """The plots (their names into ``result``), ``metrics.json`` and ``report.md``."""
    cm = result["point"]["confusion_matrix"]
    result["plots"] = write_plots(y, p, cm, output, classes=classes)
    result["plots"].append(plot_risk_coverage(y, p, output / "risk_coverage.png").name)
    (output / "metrics.json").write_text(json.dumps(result, indent=2, allow_nan=False))
    (output / "report.md").write_text(render_markdown(result, title))
