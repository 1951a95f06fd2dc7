"""Classification, calibration and melanoma metrics, with lesion-level bootstrap intervals.

This is the one place metrics are computed. Everything takes numpy arrays (``y_true`` as class
indices, ``probs`` as an ``(n, n_classes)`` row-stochastic array) and returns plain, JSON-able
python values, with ``None`` wherever a metric is undefined (never NaN).

Point estimates and bootstrap replicates go through the same weighted implementation: a point
estimate is the replicate whose weights are all one, and a bootstrap replicate weights each image
by how often it (or its lesion) was drawn. That keeps the two consistent by construction and lets
1000 replicates run as a few matrix products instead of 1000 sklearn calls.

Example::

    report = evaluate_predictions(y_true, probs, groups=lesion_ids, classes=CLASSES, n_boot=1000)
    report["point"]["balanced_accuracy"], report["ci95"]["balanced_accuracy"]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from skinlesion.core.labels import MELANOMA

# The floor scikit-learn uses, so log loss agrees with sklearn.metrics.log_loss.
LOG_LOSS_EPS = float(np.finfo(np.float64).eps)
# Bootstrap replicates are evaluated in chunks so that the (replicates x images) weight matrices,
# and the few temporaries of their size, stay at tens of MB whatever the data size.
_CHUNK_ELEMENTS = 2_000_000

_SCALARS = ("accuracy", "balanced_accuracy", "macro_f1", "macro_auroc", "ece", "brier", "log_loss")
_SCALARS += ("predicted_absent",)  # the share predicted as a class absent from the labels
_MEL_KEYS = (
    "sensitivity_argmax",
    "specificity_argmax",
    "sensitivity_at_threshold",
    "specificity_at_threshold",
)
_PER_CLASS_POINT = ("precision", "recall", "f1", "auroc")
_PER_CLASS_BOOT = ("recall", "f1", "auroc")


@dataclass(frozen=True)
class _Prepared:
    """Per-image quantities that do not change between bootstrap replicates."""

    n: int
    n_classes: int
    n_bins: int
    present: np.ndarray  # bool (n_classes,): class has >=1 true sample in the full data
    features: np.ndarray  # (n, n_features): columns summed with replicate weights
    scores_sorted: list[tuple[np.ndarray, np.ndarray, np.ndarray] | None]  # per class, for AUROC
    mel_index: int | None
    has_threshold: bool


def _check_inputs(
    y_true: np.ndarray, probs: np.ndarray, n_classes: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Validated (int64 labels, float64 probs); ``n_classes=None`` takes it from ``probs``."""
    y = np.asarray(y_true)
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or (n_classes is not None and p.shape[1] != n_classes):
        raise ValueError(f"probs must have shape (n, {n_classes or 'n_classes'}), got {p.shape}")
    n_classes = p.shape[1]
    if y.ndim != 1 or y.shape[0] != p.shape[0]:
        raise ValueError(f"y_true must have shape ({p.shape[0]},), got {y.shape}")
    if y.shape[0] == 0:
        raise ValueError("need at least one sample")
    if not np.issubdtype(y.dtype, np.integer) and not np.all(np.mod(y, 1) == 0):
        raise ValueError("y_true must hold integer class indices")
    y = y.astype(np.int64)
    if y.min() < 0 or y.max() >= n_classes:
        raise ValueError(f"y_true values must lie in [0, {n_classes})")
    if not np.all(np.isfinite(p)):
        raise ValueError("probs contains NaN or inf")
    # A loose tolerance: float32 softmax outputs are fine, logits passed by mistake are not.
    if np.any(p < 0) or not np.allclose(p.sum(axis=1), 1.0, atol=1e-3):
        raise ValueError("probs rows must be non-negative and sum to 1 (pass softmax outputs)")
    return y, p


def _confidence_bins(confidence: np.ndarray, n_bins: int) -> np.ndarray:
    """Equal-width bin index per confidence, bins are (lo, hi] with 0 going to the first bin."""
    return np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)


def _prepare(
    y: np.ndarray,
    p: np.ndarray,
    classes: Sequence[str],
    mel_threshold: float | None,
    n_bins: int = 15,
) -> _Prepared:
    n, k = p.shape
    pred = p.argmax(axis=1)
    confidence = p[np.arange(n), pred]
    correct = (pred == y).astype(np.float64)
    bins = _confidence_bins(confidence, n_bins)
    onehot = np.zeros((n, k))
    onehot[np.arange(n), y] = 1.0

    cells = np.zeros((n, k * k))
    cells[np.arange(n), y * k + pred] = 1.0
    bin_correct = np.zeros((n, n_bins))
    bin_correct[np.arange(n), bins] = correct
    bin_conf = np.zeros((n, n_bins))
    bin_conf[np.arange(n), bins] = confidence
    brier = ((p - onehot) ** 2).sum(axis=1)
    log_loss = -np.log(np.clip(p[np.arange(n), y], LOG_LOSS_EPS, 1.0))

    mel_index = list(classes).index(MELANOMA) if MELANOMA in classes else None
    mel_cols = np.zeros((n, 2))
    if mel_index is not None and mel_threshold is not None:
        flagged = p[:, mel_index] >= mel_threshold
        is_mel = y == mel_index
        mel_cols[:, 0] = is_mel & flagged  # true positives at the threshold
        mel_cols[:, 1] = ~is_mel & ~flagged  # true negatives at the threshold
    features = np.concatenate(
        [cells, bin_correct, bin_conf, brier[:, None], log_loss[:, None], mel_cols], axis=1
    )

    present = np.bincount(y, minlength=k) > 0
    scores_sorted: list[tuple[np.ndarray, np.ndarray, np.ndarray] | None] = []
    for c in range(k):
        if not present[c]:
            scores_sorted.append(None)
            continue
        order = np.argsort(p[:, c], kind="stable")
        s = p[order, c]
        # Tied scores form one group so that ties count one half, as in the Mann-Whitney U.
        starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
        scores_sorted.append((order, starts, y[order] == c))
    return _Prepared(
        n=n,
        n_classes=k,
        n_bins=n_bins,
        present=present,
        features=features,
        scores_sorted=scores_sorted,
        mel_index=mel_index,
        has_threshold=mel_index is not None and mel_threshold is not None,
    )


def _weighted_auroc(
    weights: np.ndarray, order: np.ndarray, starts: np.ndarray, positive: np.ndarray
) -> np.ndarray:
    """One-vs-rest AUROC for each row of ``weights`` (B, n); NaN where a side has no weight."""
    w = weights[:, order]
    pos = np.add.reduceat(np.where(positive, w, 0.0), starts, axis=1)
    neg = np.add.reduceat(np.where(positive, 0.0, w), starts, axis=1)
    neg_below = np.cumsum(neg, axis=1) - neg
    n_pos = pos.sum(axis=1)
    n_neg = neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (pos * (neg_below + 0.5 * neg)).sum(axis=1) / (n_pos * n_neg)
    return np.where((n_pos > 0) & (n_neg > 0), auc, np.nan)


def _mel_metrics(
    prep: _Prepared, cm: np.ndarray, mel_tp: np.ndarray, mel_tn: np.ndarray
) -> dict[str, np.ndarray]:
    """Melanoma-vs-rest sensitivity and specificity, for argmax and for the threshold."""
    nan = np.full(cm.shape[0], np.nan)
    m = prep.mel_index
    if m is None:
        return {f"mel.{key}": nan for key in _MEL_KEYS}
    n_mel = cm[:, m, :].sum(axis=1)
    n_other = cm.sum(axis=(1, 2)) - n_mel
    mel_hits = cm[:, m, m]
    false_alarms = cm[:, :, m].sum(axis=1) - mel_hits
    with np.errstate(invalid="ignore", divide="ignore"):
        sensitivity = np.where(n_mel > 0, mel_hits / n_mel, np.nan)
        specificity = np.where(n_other > 0, (n_other - false_alarms) / n_other, np.nan)
        sensitivity_t = np.where(n_mel > 0, mel_tp / n_mel, np.nan)
        specificity_t = np.where(n_other > 0, mel_tn / n_other, np.nan)
    return {
        "mel.sensitivity_argmax": sensitivity,
        "mel.specificity_argmax": specificity,
        "mel.sensitivity_at_threshold": sensitivity_t if prep.has_threshold else nan,
        "mel.specificity_at_threshold": specificity_t if prep.has_threshold else nan,
    }


def _weighted_metrics(prep: _Prepared, weights: np.ndarray) -> dict[str, np.ndarray]:
    """Every scalar metric for each row of ``weights`` (B, n); NaN marks an undefined value.

    Macro metrics average the classes present in the full data; a replicate in which one of them
    is missing has no value for them, so every replicate estimates the same quantity.
    """
    k, nb = prep.n_classes, prep.n_bins
    sums = weights @ prep.features
    total = weights.sum(axis=1)
    cm = sums[:, : k * k].reshape(-1, k, k)
    bin_correct = sums[:, k * k : k * k + nb]
    bin_conf = sums[:, k * k + nb : k * k + 2 * nb]
    brier, log_loss, mel_tp, mel_tn = sums[:, k * k + 2 * nb :].T

    tp = np.diagonal(cm, axis1=1, axis2=2)
    rows = cm.sum(axis=2)
    cols = cm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(rows > 0, tp / rows, np.nan)
        # A present class that is never predicted has precision 0, as sklearn's zero_division=0.
        precision = np.where(rows > 0, np.where(cols > 0, tp / cols, 0.0), np.nan)
        f1 = np.where(rows > 0, 2 * tp / (rows + cols), np.nan)
    auroc = np.full((weights.shape[0], k), np.nan)
    for c, sorted_scores in enumerate(prep.scores_sorted):
        if sorted_scores is not None:
            auroc[:, c] = _weighted_auroc(weights, *sorted_scores)

    present = prep.present
    out = {
        "accuracy": tp.sum(axis=1) / total,
        "balanced_accuracy": recall[:, present].mean(axis=1),
        "macro_f1": f1[:, present].mean(axis=1),
        "macro_auroc": (
            auroc[:, present].mean(axis=1) if present.sum() >= 2 else np.full(len(total), np.nan)
        ),
        "ece": np.abs(bin_correct - bin_conf).sum(axis=1) / total,
        "brier": brier / total,
        "log_loss": log_loss / total,
        "predicted_absent": cols[:, ~present].sum(axis=1) / total,
    }
    out.update(_mel_metrics(prep, cm, mel_tp, mel_tn))
    per_class = {"precision": precision, "recall": recall, "f1": f1, "auroc": auroc}
    for name, values in per_class.items():
        for c in range(k):
            out[f"per_class.{c}.{name}"] = values[:, c]
    out["_confusion"] = cm
    return out


def _to_float(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def point_metrics(
    y_true: np.ndarray,
    probs: np.ndarray,
    *,
    classes: Sequence[str],
    mel_threshold: float | None = None,
) -> dict:
    """Point estimates of every metric, as JSON-able python values.

    Macro metrics (balanced accuracy, macro F1, macro AUROC) average the classes with a true
    sample; absent classes are in ``classes_absent`` (per-class values ``None``), and
    ``predicted_absent`` is the share of images predicted as one of them. ``mel`` holds
    melanoma-vs-rest sensitivity/specificity for the argmax and, given ``mel_threshold``, at it.
    """
    y, p = _check_inputs(y_true, probs, len(classes))
    prep = _prepare(y, p, classes, mel_threshold)
    values = _weighted_metrics(prep, np.ones((1, prep.n)))
    per_class = {}
    for c, name in enumerate(classes):
        # Absent classes get None throughout: a zero would read as "always wrong".
        if prep.present[c]:
            entry = {key: _to_float(values[f"per_class.{c}.{key}"][0]) for key in _PER_CLASS_POINT}
        else:
            entry = dict.fromkeys(_PER_CLASS_POINT)
        entry["support"] = int((y == c).sum())
        entry["absent"] = not bool(prep.present[c])
        per_class[name] = entry
    mel = {key: _to_float(values[f"mel.{key}"][0]) for key in _MEL_KEYS}
    mel["threshold"] = None if mel_threshold is None else float(mel_threshold)
    result: dict = {
        "n": prep.n,
        "classes_present": [name for c, name in enumerate(classes) if prep.present[c]],
        "classes_absent": [name for c, name in enumerate(classes) if not prep.present[c]],
    }
    result.update({key: _to_float(values[key][0]) for key in _SCALARS})
    result["per_class"] = per_class
    result["confusion_matrix"] = np.rint(values["_confusion"][0]).astype(int).tolist()
    result["mel"] = mel
    return result


def _group_codes(groups: np.ndarray, n: int) -> np.ndarray:
    groups = np.asarray(groups)
    if groups.shape != (n,):
        raise ValueError(f"groups must have shape ({n},), got {groups.shape}")
    return np.unique(groups, return_inverse=True)[1].reshape(n)


def _row_counts(draws: np.ndarray, n_items: int) -> np.ndarray:
    """Count matrix (rows, n_items) of how often each item appears in each row of ``draws``."""
    rows = draws.shape[0]
    flat = (draws + np.arange(rows)[:, None] * n_items).ravel()
    return np.bincount(flat, minlength=rows * n_items).reshape(rows, n_items).astype(np.float64)


def draw_bootstrap_weights(
    n: int, n_boot: int, rng: np.random.Generator, groups: np.ndarray | None = None
) -> np.ndarray:
    """How often each of ``n`` images is drawn in each of ``n_boot`` replicates, shape (n_boot, n).

    Without ``groups`` images are drawn with replacement. With ``groups`` (lesion ids) the groups
    are drawn with replacement and every image of a drawn group comes along, so all images of one
    group share the same count: images of one lesion are not independent samples.
    """
    if groups is None:
        return _row_counts(rng.integers(0, n, size=(n_boot, n)), n)
    codes = _group_codes(groups, n)
    n_groups = int(codes.max()) + 1
    return _row_counts(rng.integers(0, n_groups, size=(n_boot, n_groups)), n_groups)[:, codes]


def replicate_metrics(
    y_true: np.ndarray, probs: np.ndarray, weights: np.ndarray, *, classes: Sequence[str]
) -> dict[str, np.ndarray]:
    """Balanced accuracy and each class's AUROC (``auroc.<class>``) per row of bootstrap
    ``weights`` (B, n); NaN where undefined. The same weights for two models pair them."""
    y, p = _check_inputs(y_true, probs, len(classes))
    prep, chunk = _prepare(y, p, classes, None), max(1, _CHUNK_ELEMENTS // len(y))
    parts = [_weighted_metrics(prep, weights[i : i + chunk]) for i in range(0, len(weights), chunk)]
    keys = {"balanced_accuracy": "balanced_accuracy"}
    keys.update({f"auroc.{name}": f"per_class.{c}.auroc" for c, name in enumerate(classes)})
    return {k: np.concatenate([part[v] for part in parts]) for k, v in keys.items()}


def _interval(values: np.ndarray, alpha: float) -> tuple[list[float] | None, int]:
    valid = values[np.isfinite(values)]
    if valid.size == 0:
        return None, 0
    low, high = np.percentile(valid, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return [float(low), float(high)], int(valid.size)


def bootstrap_metrics(
    y_true: np.ndarray,
    probs: np.ndarray,
    groups: np.ndarray | None = None,
    *,
    classes: Sequence[str],
    mel_threshold: float | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict:
    """Percentile bootstrap intervals for every scalar metric.

    With ``groups`` (lesion ids) whole lesions are resampled, otherwise images. Replicates where a
    metric is undefined (e.g. a class drawn zero times) are skipped for that metric; ``n_valid``
    says how many replicates each interval rests on. ``intervals`` mirrors the layout of
    :func:`point_metrics`: scalars at the top, ``mel`` and ``per_class`` (recall, f1, auroc) nested.
    """
    y, p = _check_inputs(y_true, probs, len(classes))
    if n_boot < 0 or not 0 < alpha < 1:
        raise ValueError("n_boot must be >= 0 and alpha in (0, 1)")
    if groups is not None:
        _group_codes(groups, len(y))
    prep = _prepare(y, p, classes, mel_threshold)
    rng = np.random.default_rng(seed)
    chunk = max(1, _CHUNK_ELEMENTS // prep.n)
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, n_boot, chunk):
        weights = draw_bootstrap_weights(prep.n, min(chunk, n_boot - start), rng, groups)
        for key, values in _weighted_metrics(prep, weights).items():
            if key != "_confusion":
                parts.setdefault(key, []).append(values)
    empty = np.empty(0)

    def interval(key: str) -> tuple[list[float] | None, int]:
        return _interval(np.concatenate(parts[key]) if key in parts else empty, alpha)

    intervals: dict = {"mel": {}, "per_class": {}}
    n_valid: dict = {"mel": {}, "per_class": {}}
    for key in _SCALARS:
        intervals[key], n_valid[key] = interval(key)
    for key in _MEL_KEYS:
        intervals["mel"][key], n_valid["mel"][key] = interval(f"mel.{key}")
    for c, name in enumerate(classes):
        intervals["per_class"][name], n_valid["per_class"][name] = {}, {}
        for key in _PER_CLASS_BOOT:
            found = interval(f"per_class.{c}.{key}")
            intervals["per_class"][name][key], n_valid["per_class"][name][key] = found
    return {
        "n_boot": int(n_boot),
        "alpha": float(alpha),
        "seed": int(seed),
        "bootstrap_unit": "image" if groups is None else "lesion",
        "intervals": intervals,
        "n_valid": n_valid,
    }


def melanoma_threshold_for_specificity(
    y_true: np.ndarray,
    probs: np.ndarray,
    specificity: float = 0.95,
    *,
    classes: Sequence[str],
) -> float:
    """Smallest threshold on ``p_mel`` whose melanoma-vs-rest specificity reaches ``specificity``.

    Candidates are the observed ``p_mel`` values; an image counts as flagged when
    ``p_mel >= threshold``. Choose it on out-of-fold predictions and apply it unchanged to
    external sets. If even the largest observed score is too low, the next float above it is
    returned (nothing flagged, specificity 1).
    """
    y, p = _check_inputs(y_true, probs, len(classes))
    if MELANOMA not in classes:
        raise ValueError(f"classes has no {MELANOMA!r}")
    if not 0.0 <= specificity <= 1.0:
        raise ValueError("specificity must lie in [0, 1]")
    m = list(classes).index(MELANOMA)
    scores = p[:, m]
    negatives = np.sort(scores[y != m])
    if negatives.size == 0:
        raise ValueError("no non-melanoma samples: specificity is undefined")
    candidates = np.unique(scores)
    # Specificity at t is the share of negatives strictly below t.
    spec = np.searchsorted(negatives, candidates, side="left") / negatives.size
    # The tolerance keeps e.g. 19/20 from failing a 0.95 target through float rounding.
    ok = np.flatnonzero(spec >= specificity - 1e-12)
    if ok.size:
        return float(candidates[ok[0]])
    return float(np.nextafter(candidates[-1], np.inf))


def reliability_bins(y_true: np.ndarray, probs: np.ndarray, n_bins: int = 15) -> dict:
    """Equal-width bins on the top-class confidence: edges, counts, accuracy, mean confidence.

    Empty bins have ``None`` accuracy and confidence. ``ece`` is the count-weighted mean of
    ``|accuracy - confidence|``, the same number as :func:`expected_calibration_error`.
    """
    y, p = _check_inputs(y_true, probs)
    if n_bins < 1:
        raise ValueError("n_bins must be >= 1")
    pred = p.argmax(axis=1)
    confidence = p[np.arange(len(y)), pred]
    bins = _confidence_bins(confidence, n_bins)
    count = np.bincount(bins, minlength=n_bins)
    correct = np.bincount(bins, weights=(pred == y).astype(np.float64), minlength=n_bins)
    conf_sum = np.bincount(bins, weights=confidence, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = correct / count
        mean_conf = conf_sum / count
    return {
        "edges": np.linspace(0.0, 1.0, n_bins + 1).tolist(),
        "count": count.astype(int).tolist(),
        "accuracy": [_to_float(a) for a in accuracy],
        "confidence": [_to_float(c) for c in mean_conf],
        "ece": float(np.abs(correct - conf_sum).sum() / len(y)),
    }


def expected_calibration_error(y_true: np.ndarray, probs: np.ndarray, n_bins: int = 15) -> float:
    """ECE over equal-width top-class confidence bins: sum over bins |acc - conf| * n_bin / n."""
    return reliability_bins(y_true, probs, n_bins)["ece"]


def roc_curve_points(
    y_true: np.ndarray, probs: np.ndarray, class_index: int
) -> tuple[np.ndarray, np.ndarray]:
    """One-vs-rest ROC curve of one class: (fpr, tpr) at every distinct score, from (0, 0)."""
    y = np.asarray(y_true)
    scores = np.asarray(probs, dtype=np.float64)[:, class_index]
    positive = y == class_index
    if positive.all() or not positive.any():
        raise ValueError("ROC needs both positive and negative samples")
    order = np.argsort(-scores, kind="stable")
    s = scores[order]
    ends = np.r_[np.flatnonzero(s[1:] != s[:-1]), len(s) - 1]
    tps = np.cumsum(positive[order])[ends]
    fps = ends + 1 - tps
    return np.r_[0.0, fps / fps[-1]], np.r_[0.0, tps / tps[-1]]


def evaluate_predictions(
    y_true: np.ndarray,
    probs: np.ndarray,
    groups: np.ndarray | None = None,
    *,
    classes: Sequence[str],
    mel_threshold: float | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict:
    """Point metrics and 95% bootstrap intervals together: the JSON that reports write.

    Keys: ``n``, ``point`` (see :func:`point_metrics`), ``ci95`` and ``ci_n_valid`` (see
    :func:`bootstrap_metrics`), ``n_boot``, ``seed`` and ``bootstrap_unit`` ("lesion" when
    ``groups`` is given, else "image").
    """
    kw: dict[str, Any] = {"classes": classes, "mel_threshold": mel_threshold}
    point = point_metrics(y_true, probs, **kw)
    boot = bootstrap_metrics(y_true, probs, groups, n_boot=n_boot, seed=seed, **kw)
    ci = {"ci95": boot["intervals"], "ci_n_valid": boot["n_valid"]}
    kept = {k: boot[k] for k in ("n_boot", "seed", "bootstrap_unit")}
    return {"n": point["n"], "point": point, **ci, **kept}
