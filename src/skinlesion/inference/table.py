"""The predictions table: one row per image, built here for every entry point (``skinlesion
predict`` with either backend, ``LoadedModel.predict``, ``OnnxModel.predict`` and the service's
JSON answer), so a row means the same wherever it comes from.

Columns, in this order (:func:`table_columns`):

==================  ================================================================================
``image``           the path as given; ``<image K>`` for an in-memory image; the upload's file name
                    in the service
one per class       the calibrated probability of each class, in the model's class order
``prediction``      the class of highest probability
``melanoma_flag``   p(mel) >= the model's melanoma threshold (its card's out-of-fold threshold)
``unfamiliarity``   how unlike the training images the image is: a distance in feature space
                    (:mod:`skinlesion.inference.familiarity`) scaled so that 1.00 is the
                    held-out 99th percentile; NaN (empty) when the model has no familiarity
``refer``           whether the model's refer rules (:mod:`skinlesion.inference.refer`) fire,
                    "unlike the training images" among them when ``unfamiliarity`` > 1
``refer_reasons``   why, ``"; "``-joined (a list in the service's JSON); empty when not referred
``error``           why the image could not be read; empty when it was
==================  ================================================================================

A failed row (``error`` not empty) has NaN probabilities and ``unfamiliarity``, an empty
``prediction`` and empty (NA) ``melanoma_flag`` and ``refer``: never a made-up uniform answer.
A model without a melanoma threshold (a checkpoint whose run has no out-of-fold report) or
without a ``mel`` class leaves ``melanoma_flag`` empty on every row; one without refer rules
leaves ``refer`` empty unless it has a familiarity (then ``refer`` is that rule alone); each is
logged once when the :class:`Decisions` are made or the model loads.

Example::

    decisions = Decisions.of(classes, reference, "runs/quick")
    df = predictions_table(["a.jpg"], probs, {}, decisions, unfamiliarity)
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from skinlesion.core.labels import MELANOMA
from skinlesion.inference.refer import refer_decision, refer_rules

log = logging.getLogger(__name__)

DECISION_COLUMNS: tuple[str, ...] = (
    "prediction",
    "melanoma_flag",
    "unfamiliarity",
    "refer",
    "refer_reasons",
    "error",
)
"""The columns after the class probabilities, in order."""
REASON_SEPARATOR = "; "


def table_columns(classes: Sequence[str]) -> list[str]:
    """Every column of the table, in order: ``image``, the classes, :data:`DECISION_COLUMNS`."""
    return ["image", *classes, *DECISION_COLUMNS]


@dataclass(frozen=True)
class Decisions:
    """What turns a model's probabilities into decisions: its class names, its melanoma
    threshold (``None``: no flag) and its refer rules (empty: no refer decision)."""

    classes: tuple[str, ...]
    mel_threshold: float | None = None
    rules: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def of(
        cls, classes: Sequence[str], reference: Mapping[str, Any] | None, source: str
    ) -> Decisions:
        """The decisions of a model whose out-of-fold ``reference`` (``mel_threshold``,
        ``refer``) came with it; what is missing is logged, naming ``source``."""
        classes = tuple(classes)
        threshold = (reference or {}).get("mel_threshold")
        if MELANOMA not in classes:
            log.info("%s: no '%s' class, so melanoma_flag is empty", source, MELANOMA)
            threshold = None
        elif threshold is None:
            log.warning(
                "%s: no melanoma threshold (no out-of-fold report with the model), so "
                "melanoma_flag is empty",
                source,
            )
        rules = refer_rules(dict(reference or {}))
        if not rules:
            log.warning("%s: no refer rules with the model, so refer is empty", source)
        return cls(classes, None if threshold is None else float(threshold), rules)


def _check_rows(probs: np.ndarray, errors: Mapping[int, str], n_classes: int) -> None:
    """A failed row must be all NaN and a good one finite: anything else is a bug upstream
    (a failed image given made-up probabilities), which must not reach a table."""
    if probs.ndim != 2 or probs.shape[1] != n_classes:
        raise ValueError(f"probabilities of shape {probs.shape}, expected (N, {n_classes})")
    for i, row in enumerate(probs):
        failed = i in errors
        if failed and not np.isnan(row).all():
            raise ValueError(f"row {i} failed ({errors[i]}) but has probabilities {row}")
        if not failed and not np.isfinite(row).all():
            raise ValueError(f"row {i} has no error but non-finite probabilities {row}")


def _unfamiliarity(
    unfamiliarity: np.ndarray | None, n: int, errors: Mapping[int, str]
) -> list[float | None]:
    """One value per row, ``None`` where the model has none or the image failed."""
    if unfamiliarity is None:
        return [None] * n
    u = np.asarray(unfamiliarity, dtype=np.float64)
    if u.shape != (n,):
        raise ValueError(f"unfamiliarity of shape {u.shape}, expected ({n},)")
    out: list[float | None] = []
    for i, v in enumerate(u):
        if i in errors or np.isnan(v):
            out.append(None)
        elif not np.isfinite(v):
            raise ValueError(f"row {i} has a non-finite unfamiliarity {v}")
        else:
            out.append(float(v))
    return out


def prediction_rows(
    images: Sequence[str],
    probs: np.ndarray,
    errors: Mapping[int, str],
    decisions: Decisions,
    unfamiliarity: np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """One dict per image, keys in :func:`table_columns` order; ``refer_reasons`` is a list
    here (joined in :func:`predictions_table`). ``errors``: ``{row: message}`` of the images
    that could not be read (their probabilities NaN). ``unfamiliarity``: (N,) the ensemble's
    (``None``: the model has no familiarity)."""
    probs = np.asarray(probs, dtype=np.float64)
    classes = decisions.classes
    _check_rows(probs, errors, len(classes))
    if len(images) != len(probs):
        raise ValueError(f"{len(images)} image names for {len(probs)} rows of probabilities")
    unfamiliar = _unfamiliarity(unfamiliarity, len(probs), errors)
    threshold = decisions.mel_threshold
    mel = classes.index(MELANOMA) if threshold is not None else -1
    rows = []
    for i, (name, p) in enumerate(zip(images, probs, strict=True)):
        row: dict[str, Any] = {"image": str(name)}
        row.update({c: float(v) for c, v in zip(classes, p, strict=True)})
        if i in errors:
            row.update(prediction="", melanoma_flag=None, unfamiliarity=None, refer=None)
            row.update(refer_reasons=[], error=errors[i])
        else:
            p_mel = float(p[mel])
            u = unfamiliar[i]
            refer, reasons = refer_decision(p, dict(decisions.rules), u)
            row["prediction"] = classes[int(p.argmax())]
            row["melanoma_flag"] = None if threshold is None else bool(p_mel >= threshold)
            row["unfamiliarity"] = u
            row["refer"] = refer if decisions.rules or u is not None else None
            row["refer_reasons"] = reasons
            row["error"] = ""
        rows.append(row)
    return rows


def predictions_table(
    images: Sequence[str],
    probs: np.ndarray,
    errors: Mapping[int, str],
    decisions: Decisions,
    unfamiliarity: np.ndarray | None = None,
) -> pd.DataFrame:
    """The predictions table (see the module's docstring): the rows of :func:`prediction_rows`,
    ``melanoma_flag`` and ``refer`` as nullable booleans (NA where undecided), the reasons
    joined by ``"; "``."""
    rows = prediction_rows(images, probs, errors, decisions, unfamiliarity)
    df = pd.DataFrame(rows, columns=table_columns(decisions.classes))
    for c in (*decisions.classes, "unfamiliarity"):
        df[c] = df[c].astype("float64")
    for c in ("melanoma_flag", "refer"):
        df[c] = df[c].astype("boolean")
    df["refer_reasons"] = [REASON_SEPARATOR.join(r) for r in df["refer_reasons"]]
    return df
