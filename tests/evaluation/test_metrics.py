import inspect
import json
import math

import numpy as np
import pytest
from sklearn import metrics as skm

from skinlesion.core.labels import CLASSES
from skinlesion.evaluation.metrics import (
    bootstrap_metrics,
    draw_bootstrap_weights,
    evaluate_predictions,
    expected_calibration_error,
    melanoma_threshold_for_specificity,
    point_metrics,
    reliability_bins,
    roc_curve_points,
)

K = len(CLASSES)
MEL = CLASSES.index("mel")
NV = CLASSES.index("nv")
BCC = CLASSES.index("bcc")
SCALARS = ("accuracy", "balanced_accuracy", "macro_f1", "macro_auroc", "ece", "brier", "log_loss")


def random_predictions(
    n: int, seed: int, prior: tuple[float, ...] = (0.03, 0.05, 0.11, 0.01, 0.11, 0.67, 0.02)
) -> tuple[np.ndarray, np.ndarray]:
    """Imbalanced labels and informative but noisy softmax outputs."""
    rng = np.random.default_rng(seed)
    y = rng.choice(K, size=n, p=np.asarray(prior) / sum(prior))
    logits = rng.normal(size=(n, K))
    logits[np.arange(n), y] += 1.5
    probs = np.exp(logits)
    return y, probs / probs.sum(axis=1, keepdims=True)


def sk_log_loss(y: np.ndarray, probs: np.ndarray) -> float:
    # sklearn 1.9 renamed y_pred to y_proba; the project allows older versions too.
    if "y_proba" in inspect.signature(skm.log_loss).parameters:
        return skm.log_loss(y, y_proba=probs, labels=list(range(K)))
    return skm.log_loss(y, probs, labels=list(range(K)))


def assert_plain_json(value: object) -> None:
    """Only python builtins (no numpy scalars), and no NaN or inf anywhere."""
    if isinstance(value, dict):
        assert all(isinstance(k, str) for k in value)
        for v in value.values():
            assert_plain_json(v)
    elif isinstance(value, list):
        for v in value:
            assert_plain_json(v)
    else:
        assert type(value) in (int, float, bool, str, type(None)), type(value)
        if isinstance(value, float):
            assert math.isfinite(value)


# --- exactly known cases ------------------------------------------------------------------------


def test_perfect_classifier() -> None:
    y = np.repeat(np.arange(K), [3, 4, 5, 2, 6, 10, 2])
    probs = np.eye(K)[y]
    m = point_metrics(y, probs, mel_threshold=0.5)
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "macro_auroc"):
        assert m[key] == pytest.approx(1.0)
    assert m["ece"] == pytest.approx(0.0, abs=1e-12)
    assert m["brier"] == pytest.approx(0.0, abs=1e-12)
    assert m["log_loss"] == pytest.approx(0.0, abs=1e-12)
    assert m["classes_absent"] == []
    assert m["confusion_matrix"] == np.diag(np.bincount(y)).tolist()
    for name in CLASSES:
        assert m["per_class"][name]["absent"] is False
        for key in ("precision", "recall", "f1", "auroc"):
            assert m["per_class"][name][key] == pytest.approx(1.0)
    assert m["mel"] == {
        "sensitivity_argmax": 1.0,
        "specificity_argmax": 1.0,
        "threshold": 0.5,
        "sensitivity_at_threshold": 1.0,
        "specificity_at_threshold": 1.0,
    }


def test_constant_nv_classifier() -> None:
    counts = [2, 3, 5, 1, 4, 10, 0]  # vasc absent
    y = np.repeat(np.arange(K), counts)
    n = len(y)
    probs = np.zeros((n, K))
    probs[:, NV] = 1.0
    m = point_metrics(y, probs)
    n_present = 6
    assert m["classes_absent"] == ["vasc"]
    assert m["accuracy"] == pytest.approx(10 / n)
    assert m["balanced_accuracy"] == pytest.approx(1 / n_present)
    # nv: tp=10, fp=15, fn=0 -> F1 = 20/35; every other present class has F1 0.
    assert m["macro_f1"] == pytest.approx((20 / 35) / n_present)
    # All scores tie, so every one-vs-rest AUROC is exactly one half.
    assert m["macro_auroc"] == pytest.approx(0.5)
    assert m["ece"] == pytest.approx(1 - 10 / n)
    assert m["brier"] == pytest.approx(2 * (n - 10) / n)
    assert m["log_loss"] == pytest.approx(-math.log(np.finfo(np.float64).eps) * (n - 10) / n)
    assert m["mel"]["sensitivity_argmax"] == 0.0
    assert m["mel"]["specificity_argmax"] == 1.0
    assert m["per_class"]["nv"]["precision"] == pytest.approx(10 / n)
    assert m["per_class"]["mel"]["precision"] == 0.0  # present, never predicted: 0 as sklearn
    assert m["per_class"]["vasc"]["precision"] is None


def test_small_hand_computed_case() -> None:
    # Rows: true class, then (p_bcc, p_mel, p_nv); chosen so that no confidence sits on a bin edge.
    rows = [
        (MEL, 0.00, 0.70, 0.30),  # correct, conf .70
        (MEL, 0.00, 0.35, 0.65),  # predicted nv, conf .65
        (NV, 0.00, 0.10, 0.90),  # correct, conf .90
        (NV, 0.00, 0.15, 0.85),  # correct, conf .85
        (NV, 0.00, 0.55, 0.45),  # predicted mel, conf .55
        (BCC, 0.50, 0.20, 0.30),  # correct, conf .50
    ]
    y = np.array([r[0] for r in rows])
    probs = np.zeros((len(rows), K))
    probs[:, [BCC, MEL, NV]] = [r[1:] for r in rows]
    m = point_metrics(y, probs, mel_threshold=0.3)

    assert m["n"] == 6
    assert m["classes_present"] == ["bcc", "mel", "nv"]
    assert m["classes_absent"] == ["akiec", "bkl", "df", "vasc"]
    assert m["accuracy"] == pytest.approx(4 / 6)
    recall = {"mel": 1 / 2, "nv": 2 / 3, "bcc": 1.0}
    precision = {"mel": 1 / 2, "nv": 2 / 3, "bcc": 1.0}
    f1 = {"mel": 2 * 1 / (2 + 2), "nv": 2 * 2 / (3 + 3), "bcc": 1.0}  # 2tp / (n_true + n_pred)
    # mel: .70 beats all 4 negatives, .35 beats .10/.15/.20 -> 7/8; nv: 3 + 3 + 2 of 9 pairs.
    auroc = {"mel": 7 / 8, "nv": 8 / 9, "bcc": 1.0}
    for name in ("mel", "nv", "bcc"):
        entry = m["per_class"][name]
        assert entry["recall"] == pytest.approx(recall[name])
        assert entry["precision"] == pytest.approx(precision[name])
        assert entry["f1"] == pytest.approx(f1[name])
        assert entry["auroc"] == pytest.approx(auroc[name])
    assert m["balanced_accuracy"] == pytest.approx(sum(recall.values()) / 3)
    assert m["macro_f1"] == pytest.approx(sum(f1.values()) / 3)
    assert m["macro_auroc"] == pytest.approx(sum(auroc.values()) / 3)
    # Every sample has its own 1/15-wide bin, so ECE is the mean |correct - confidence|.
    assert m["ece"] == pytest.approx((0.30 + 0.65 + 0.10 + 0.15 + 0.55 + 0.50) / 6)
    brier = [
        0.3**2 + 0.3**2,
        0.65**2 + 0.65**2,
        0.1**2 + 0.1**2,
        0.15**2 + 0.15**2,
        0.55**2 + 0.55**2,
        0.5**2 + 0.2**2 + 0.3**2,
    ]
    assert m["brier"] == pytest.approx(sum(brier) / 6)
    p_true = [0.70, 0.35, 0.90, 0.85, 0.45, 0.50]
    assert m["log_loss"] == pytest.approx(-sum(math.log(p) for p in p_true) / 6)
    assert m["mel"] == pytest.approx(
        {
            "sensitivity_argmax": 1 / 2,
            "specificity_argmax": 3 / 4,
            "threshold": 0.3,
            "sensitivity_at_threshold": 1.0,  # .70 and .35 both >= .3
            "specificity_at_threshold": 3 / 4,  # only the nv at .55 is flagged
        }
    )
    cm = np.zeros((K, K), dtype=int)
    cm[MEL, MEL] = cm[MEL, NV] = cm[NV, MEL] = cm[BCC, BCC] = 1
    cm[NV, NV] = 2
    assert m["confusion_matrix"] == cm.tolist()
    for name in ("akiec", "bkl", "df", "vasc"):
        assert m["per_class"][name]["absent"] is True


# --- agreement with sklearn ---------------------------------------------------------------------


# sklearn warns when a class is predicted but absent from y_true; that case is tested on purpose.
@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
@pytest.mark.parametrize(
    ("seed", "prior"),
    [
        (0, (0.03, 0.05, 0.11, 0.01, 0.11, 0.67, 0.02)),
        (1, (0.1, 0.2, 0.1, 0.0, 0.2, 0.4, 0.0)),  # df and vasc absent
        (2, (1, 1, 1, 1, 1, 1, 1)),
    ],
)
def test_agrees_with_sklearn(seed: int, prior: tuple[float, ...]) -> None:
    y, probs = random_predictions(500, seed, prior)
    pred = probs.argmax(axis=1)
    present = sorted(set(y.tolist()))
    m = point_metrics(y, probs)

    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred), abs=1e-9)
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred), abs=1e-9)
    assert m["macro_f1"] == pytest.approx(
        skm.f1_score(y, pred, average="macro", labels=present, zero_division=0), abs=1e-9
    )
    aurocs = [skm.roc_auc_score(y == c, probs[:, c]) for c in present]
    assert m["macro_auroc"] == pytest.approx(np.mean(aurocs), abs=1e-9)
    assert m["log_loss"] == pytest.approx(sk_log_loss(y, probs), abs=1e-9)
    assert m["confusion_matrix"] == skm.confusion_matrix(y, pred, labels=range(K)).tolist()
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        y, pred, labels=range(K), zero_division=0
    )
    for c in present:
        entry = m["per_class"][CLASSES[c]]
        assert entry["auroc"] == pytest.approx(aurocs[present.index(c)], abs=1e-9)
        assert entry["precision"] == pytest.approx(precision[c], abs=1e-9)
        assert entry["recall"] == pytest.approx(recall[c], abs=1e-9)
        assert entry["f1"] == pytest.approx(f1[c], abs=1e-9)
        assert entry["support"] == support[c]
    onehot = np.eye(K)[y]
    assert m["brier"] == pytest.approx(((probs - onehot) ** 2).sum(axis=1).mean(), abs=1e-12)


def test_auroc_with_tied_scores_matches_sklearn() -> None:
    y, probs = random_predictions(400, 3)
    # Coarse rounding creates many ties; renormalising keeps rows stochastic.
    probs = np.round(probs, 1) + 1e-3
    probs /= probs.sum(axis=1, keepdims=True)
    m = point_metrics(y, probs)
    for c in range(K):
        expected = skm.roc_auc_score(y == c, probs[:, c])
        assert m["per_class"][CLASSES[c]]["auroc"] == pytest.approx(expected, abs=1e-9)
        fpr, tpr = roc_curve_points(y, probs, c)
        sk_fpr, sk_tpr, _ = skm.roc_curve(y == c, probs[:, c], drop_intermediate=False)
        np.testing.assert_allclose(fpr, sk_fpr)
        np.testing.assert_allclose(tpr, sk_tpr)
        area = np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2)  # trapezoids; ties are diagonal
        assert area == pytest.approx(expected, abs=1e-9)


def test_ece_is_consistent_everywhere() -> None:
    y, probs = random_predictions(1000, 4)
    ece = expected_calibration_error(y, probs)
    bins = reliability_bins(y, probs)
    assert ece == pytest.approx(point_metrics(y, probs)["ece"], abs=1e-12)
    assert ece == pytest.approx(bins["ece"], abs=1e-12)
    count = np.array(bins["count"])
    pairs = zip(bins["accuracy"], bins["confidence"], strict=True)
    gaps = [abs(a - c) for a, c in pairs if a is not None]
    assert sum(count) == 1000
    assert ece == pytest.approx(
        sum(g * n for g, n in zip(gaps, count[count > 0], strict=True)) / 1000
    )


# --- absent classes -----------------------------------------------------------------------------


def test_absent_classes_are_none_and_excluded_from_macro() -> None:
    rng = np.random.default_rng(5)
    y = rng.choice([MEL, NV], size=200, p=[0.3, 0.7])
    probs = rng.dirichlet(np.ones(K), size=200)
    m = point_metrics(y, probs)
    assert m["classes_present"] == ["mel", "nv"]
    assert m["classes_absent"] == ["akiec", "bcc", "bkl", "df", "vasc"]
    for name in m["classes_absent"]:
        entry = m["per_class"][name]
        assert entry == {
            "precision": None,
            "recall": None,
            "f1": None,
            "auroc": None,
            "support": 0,
            "absent": True,
        }
    recalls = [m["per_class"][name]["recall"] for name in ("mel", "nv")]
    f1s = [m["per_class"][name]["f1"] for name in ("mel", "nv")]
    aurocs = [m["per_class"][name]["auroc"] for name in ("mel", "nv")]
    assert m["balanced_accuracy"] == pytest.approx(np.mean(recalls))
    assert m["macro_f1"] == pytest.approx(np.mean(f1s))
    assert m["macro_auroc"] == pytest.approx(np.mean(aurocs))
    ci = bootstrap_metrics(y, probs, n_boot=50)
    assert ci["intervals"]["per_class"]["df"] == {"recall": None, "f1": None, "auroc": None}
    assert ci["n_valid"]["per_class"]["df"] == {"recall": 0, "f1": 0, "auroc": 0}


def test_single_class_has_no_auroc_or_specificity() -> None:
    y = np.full(10, MEL)
    probs = np.random.default_rng(6).dirichlet(np.ones(K), size=10)
    m = point_metrics(y, probs, mel_threshold=0.2)
    assert m["macro_auroc"] is None
    assert m["per_class"]["mel"]["auroc"] is None
    assert m["mel"]["specificity_argmax"] is None
    assert m["mel"]["specificity_at_threshold"] is None
    assert m["mel"]["sensitivity_at_threshold"] is not None
    json.dumps(evaluate_predictions(y, probs, n_boot=20), allow_nan=False)


def test_rejects_logits_and_bad_shapes() -> None:
    y, probs = random_predictions(20, 7)
    with pytest.raises(ValueError, match="sum to 1"):
        point_metrics(y, np.log(probs))
    with pytest.raises(ValueError, match="shape"):
        point_metrics(y, probs[:, :6])
    with pytest.raises(ValueError, match="lie in"):
        point_metrics(np.full(20, K), probs)


# --- bootstrap ----------------------------------------------------------------------------------


def test_grouped_weights_draw_whole_groups() -> None:
    groups = np.array(["a"] * 5 + ["b"] * 3 + [f"s{i}" for i in range(12)])
    weights = draw_bootstrap_weights(len(groups), 300, np.random.default_rng(0), groups)
    assert weights.shape == (300, len(groups))
    for name in ("a", "b"):
        members = weights[:, groups == name]
        assert (members == members[:, :1]).all()  # every image of the lesion has the same count
    # Each replicate draws as many lesions as there are (14), images follow their lesion.
    per_group = np.stack([weights[:, np.flatnonzero(groups == g)[0]] for g in np.unique(groups)])
    assert (per_group.sum(axis=0) == 14).all()
    image_weights = draw_bootstrap_weights(len(groups), 300, np.random.default_rng(0))
    assert (image_weights.sum(axis=1) == len(groups)).all()
    assert not (image_weights[:, :5] == image_weights[:, :1]).all()


def test_lesion_bootstrap_is_wider_when_images_are_duplicated() -> None:
    # One lesion with 100 identical, misclassified images and 100 single-image lesions, correct.
    n = 200
    y = np.full(n, NV)
    y[100:150] = MEL
    probs = np.full((n, K), 0.01)
    probs[np.arange(n), y] = 0.94
    probs[:100] = 0.01
    probs[:100, MEL] = 0.94
    groups = np.array(["big"] * 100 + [f"single{i}" for i in range(100)])
    by_image = bootstrap_metrics(y, probs, n_boot=400, seed=1)
    by_lesion = bootstrap_metrics(y, probs, groups=groups, n_boot=400, seed=1)
    assert by_image["bootstrap_unit"] == "image"
    assert by_lesion["bootstrap_unit"] == "lesion"
    low_i, high_i = by_image["intervals"]["accuracy"]
    low_l, high_l = by_lesion["intervals"]["accuracy"]
    assert high_l - low_l > 3 * (high_i - low_i)


@pytest.mark.parametrize("grouped", [False, True])
def test_bootstrap_replicate_equals_point_metrics_on_resampled_data(grouped: bool) -> None:
    y, probs = random_predictions(300, 8, prior=(1, 1, 1, 1, 1, 1, 1))
    groups = np.arange(300) // 3 if grouped else None
    seed = 11
    one = bootstrap_metrics(y, probs, groups=groups, mel_threshold=0.2, n_boot=1, seed=seed)
    counts = draw_bootstrap_weights(300, 1, np.random.default_rng(seed), groups)[0]
    index = np.repeat(np.arange(300), counts.astype(int))
    expected = point_metrics(y[index], probs[index], mel_threshold=0.2)
    for key in SCALARS:
        assert one["intervals"][key] == pytest.approx([expected[key]] * 2, abs=1e-12)
    for key in ("sensitivity_argmax", "specificity_at_threshold"):
        assert one["intervals"]["mel"][key] == pytest.approx([expected["mel"][key]] * 2)
    for name in CLASSES:
        for key in ("recall", "f1", "auroc"):
            value = expected["per_class"][name][key]
            assert one["intervals"]["per_class"][name][key] == pytest.approx([value] * 2)


def test_bootstrap_skips_undefined_replicates() -> None:
    y, probs = random_predictions(60, 9, prior=(0, 0, 1, 0, 1, 1, 0))
    y[0] = CLASSES.index("df")  # a single df image: missing from ~37% of resamples
    result = bootstrap_metrics(y, probs, n_boot=500, seed=2)
    n_valid = result["n_valid"]
    assert n_valid["accuracy"] == 500
    assert 250 < n_valid["per_class"]["df"]["recall"] < 400
    # Macro metrics need every class present in the data, so they are skipped alike.
    assert n_valid["balanced_accuracy"] == n_valid["per_class"]["df"]["recall"]
    assert n_valid["mel"]["sensitivity_at_threshold"] == 0  # no threshold given
    assert result["intervals"]["mel"]["sensitivity_at_threshold"] is None


def test_bootstrap_is_reproducible_and_brackets_point() -> None:
    y, probs = random_predictions(2000, 10)
    groups = np.arange(2000) // 2
    a = evaluate_predictions(y, probs, groups=groups, n_boot=200, seed=3)
    b = evaluate_predictions(y, probs, groups=groups, n_boot=200, seed=3)
    assert a == b
    for key in SCALARS:
        low, high = a["ci95"][key]
        assert low <= a["point"][key] <= high


# --- melanoma threshold -------------------------------------------------------------------------


def specificity_at(y: np.ndarray, probs: np.ndarray, threshold: float) -> float:
    negatives = probs[y != MEL, MEL]
    return float((negatives < threshold).mean())


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("decimals", [None, 2])
def test_mel_threshold_is_smallest_reaching_specificity(seed: int, decimals: int | None) -> None:
    y, probs = random_predictions(700, seed)
    if decimals is not None:  # ties between scores
        probs = np.round(probs, decimals) + 1e-4
        probs /= probs.sum(axis=1, keepdims=True)
    threshold = melanoma_threshold_for_specificity(y, probs, 0.95)
    assert specificity_at(y, probs, threshold) >= 0.95
    candidates = np.unique(probs[:, MEL])
    lower = candidates[candidates < threshold]
    assert lower.size and specificity_at(y, probs, lower.max()) < 0.95
    m = point_metrics(y, probs, mel_threshold=threshold)
    assert m["mel"]["threshold"] == threshold
    assert m["mel"]["specificity_at_threshold"] >= 0.95


def test_mel_threshold_exact_fraction_and_extremes() -> None:
    # 20 negatives: 95% means 19 below the threshold, despite 0.95 * 20 rounding above 19.
    y = np.array([NV] * 20 + [MEL] * 2)
    p_mel = np.r_[np.linspace(0.01, 0.20, 20), 0.5, 0.9]
    probs = np.zeros((22, K))
    probs[:, MEL] = p_mel
    probs[:, NV] = 1 - p_mel
    threshold = melanoma_threshold_for_specificity(y, probs, 0.95)
    assert threshold == pytest.approx(0.20)
    assert specificity_at(y, probs, threshold) == pytest.approx(0.95)
    # Asking for every negative below the threshold picks the next score up: the first melanoma.
    assert melanoma_threshold_for_specificity(y, probs, 1.0) == pytest.approx(0.5)
    # If the highest score is a negative, nothing observed works: just above it.
    probs[0, MEL], probs[0, NV] = 0.95, 0.05
    top = melanoma_threshold_for_specificity(y, probs, 1.0)
    assert top > 0.95 and specificity_at(y, probs, top) == 1.0
    with pytest.raises(ValueError, match="non-melanoma"):
        melanoma_threshold_for_specificity(y[20:], probs[20:])


# --- output format ------------------------------------------------------------------------------


def test_evaluate_predictions_is_plain_json() -> None:
    y, probs = random_predictions(300, 12, prior=(0, 1, 1, 0, 1, 3, 0))
    groups = np.arange(300) // 4
    report = evaluate_predictions(y, probs, groups=groups, mel_threshold=0.3, n_boot=100)
    assert set(report) >= {"n", "point", "ci95", "n_boot", "bootstrap_unit"}
    assert report["n"] == 300 and report["n_boot"] == 100
    assert report["bootstrap_unit"] == "lesion"
    assert set(report["ci95"]) == set(SCALARS) | {"mel", "per_class"}
    json.dumps(report, allow_nan=False)
    assert_plain_json(report)
    assert_plain_json(evaluate_predictions(y, probs, n_boot=0))
