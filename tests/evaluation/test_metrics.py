import inspect
import json
import math
import warnings
from functools import partial

import numpy as np
import pytest
from conftest import ABSENT_CLASS
from sklearn import metrics as skm

from skinlesion.core.labels import CLASSES
from skinlesion.evaluation import metrics as metrics_module
from skinlesion.evaluation.metrics import (
    draw_bootstrap_weights,
    expected_calibration_error,
    reliability_bins,
    roc_curve_points,
)

# The metric functions take the class list from their caller; these tests use HAM10000's 7.
point_metrics = partial(metrics_module.point_metrics, classes=CLASSES)
bootstrap_metrics = partial(metrics_module.bootstrap_metrics, classes=CLASSES)
evaluate_predictions = partial(metrics_module.evaluate_predictions, classes=CLASSES)
melanoma_threshold_for_specificity = partial(
    metrics_module.melanoma_threshold_for_specificity, classes=CLASSES
)

K = len(CLASSES)
MEL = CLASSES.index("mel")
NV = CLASSES.index("nv")
BCC = CLASSES.index("bcc")
SCALARS = ("accuracy", "balanced_accuracy", "macro_f1", "macro_auroc", "ece", "brier", "log_loss")
SCALARS += ("predicted_absent",)


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


def test_predicted_absent_counts_predictions_of_classes_the_labels_lack() -> None:
    """A set of mel and nv only: images predicted bcc or vasc are predicted as absent classes,
    whatever their true class; with every class present the share is 0."""
    vasc = CLASSES.index("vasc")
    y = np.array([MEL, MEL, NV, NV, NV, NV, NV, MEL])
    predicted = np.array([MEL, BCC, NV, vasc, NV, BCC, NV, NV])
    probs = np.full((len(y), K), 0.05)
    probs[np.arange(len(y)), predicted] = 0.7
    m = point_metrics(y, probs)
    assert m["predicted_absent"] == pytest.approx(3 / 8)
    result = evaluate_predictions(y, probs, groups=np.arange(len(y)), n_boot=200, seed=0)
    low, high = result["ci95"]["predicted_absent"]
    assert 0.0 <= low < 3 / 8 < high <= 1.0
    every = np.r_[y, np.arange(K)]
    probs_every = np.vstack([probs, np.eye(K) * 0.65 + 0.05])
    assert point_metrics(every, probs_every)["predicted_absent"] == 0.0


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
    assert m["predicted_absent"] == 0.0  # every prediction is a class these images have
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
        assert entry == ABSENT_CLASS
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


# --- boundaries, defaults and messages ------------------------------------------------------------


def mel_vs_nv(p_mel: list[float], is_mel: list[bool]) -> tuple[np.ndarray, np.ndarray]:
    """Labels and probabilities with only mel and nv scores: ``p_nv = 1 - p_mel``."""
    y = np.where(is_mel, MEL, NV)
    probs = np.zeros((len(p_mel), K))
    probs[:, MEL] = p_mel
    probs[:, NV] = 1 - np.asarray(p_mel)
    return y, probs


def test_mel_threshold_ties_count_as_flagged() -> None:
    # A negative tied with a candidate is flagged at that threshold (p_mel >= t), so 0.3 gives
    # specificity 2/4, not 3/4: 3/4 needs the next score up.
    y, probs = mel_vs_nv([0.1, 0.2, 0.3, 0.4, 0.3], [False] * 4 + [True])
    assert melanoma_threshold_for_specificity(y, probs, 0.75) == 0.4
    assert melanoma_threshold_for_specificity(y, probs, 0.5) == 0.3
    assert specificity_at(y, probs, 0.3) == 0.5


def test_mel_threshold_boundaries() -> None:
    y, probs = mel_vs_nv([0.1, 0.2, 0.3, 0.4, 0.35], [False] * 4 + [True])
    # Specificity 0 is a valid target: the lowest score, every image flagged.
    assert melanoma_threshold_for_specificity(y, probs, 0.0) == 0.1
    # A target reached exactly, and one within the 1e-12 rounding tolerance above it.
    assert melanoma_threshold_for_specificity(y, probs, 0.5) == 0.3
    assert 0.5 + 1e-12 - 1e-12 == 0.5
    assert melanoma_threshold_for_specificity(y, probs, 0.5 + 1e-12) == 0.3
    for bad in (-0.01, 1.5, 2.0):
        with pytest.raises(ValueError, match=r"^specificity must lie in \[0, 1\]$"):
            melanoma_threshold_for_specificity(y, probs, bad)


def test_mel_threshold_messages() -> None:
    y, probs = mel_vs_nv([0.1, 0.9], [False, True])
    with pytest.raises(ValueError, match=r"^no non-melanoma samples: specificity is undefined$"):
        melanoma_threshold_for_specificity(y[1:], probs[1:])
    with pytest.raises(ValueError, match=r"^classes has no 'mel'$"):
        melanoma_threshold_for_specificity(y, probs, classes=[f"c{i}" for i in range(K)])
    # Probabilities for fewer classes than named are refused, not read column by column.
    with pytest.raises(ValueError, match=r"^probs must have shape \(n, 7\), got \(2, 6\)$"):
        melanoma_threshold_for_specificity(y, probs[:, :6])


def test_reliability_bins_known_values() -> None:
    # 4 bins of width .25: a uniform row (conf 1/7, predicts akiec, wrong) in the first, .30
    # (wrong) and .40 (right) in the second, .60 (right) and .65 (wrong) in the third; the top
    # bin (.75, 1] is empty. mel holds the confidence and is the prediction of every other row.
    rows = [(1 / K, NV), (0.30, NV), (0.40, MEL), (0.60, MEL), (0.65, NV)]
    y = np.array([label for _, label in rows])
    conf = np.array([c for c, _ in rows])
    probs = np.repeat(((1 - conf) / (K - 1))[:, None], K, axis=1)
    probs[:, MEL] = conf
    bins = reliability_bins(y, probs, n_bins=4)
    assert bins["edges"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert bins["count"] == [1, 2, 2, 0]
    assert all(type(c) is int for c in bins["count"])
    assert bins["accuracy"] == [0.0, 0.5, 0.5, None]
    assert bins["confidence"] == pytest.approx([1 / K, 0.35, 0.625, None])
    expected_ece = (1 / K + 2 * abs(0.5 - 0.35) + 2 * abs(0.5 - 0.625)) / 5
    assert bins["ece"] == pytest.approx(expected_ece)
    assert expected_calibration_error(y, probs, n_bins=4) == pytest.approx(expected_ece)
    # In 15 bins every row has a bin of its own: the mean |correct - confidence|.
    assert point_metrics(y, probs)["ece"] == pytest.approx(np.mean([1 / K, 0.3, 0.6, 0.4, 0.65]))


def test_full_confidence_goes_to_the_top_bin() -> None:
    # Rows may sum to 1 within 1e-3, so a confidence can sit just above 1: still the top bin.
    y = np.array([MEL, NV, NV])
    probs = np.eye(K)[[MEL, NV, MEL]]
    probs[0, MEL] = 1.0005
    bins = reliability_bins(y, probs, n_bins=5)
    assert bins["count"] == [0, 0, 0, 0, 3]
    assert bins["accuracy"][-1] == pytest.approx(2 / 3)
    m = point_metrics(y, probs)
    assert m["ece"] == pytest.approx(abs(2 / 3 - 3.0005 / 3))
    # A true-class probability above 1 costs nothing: log loss never goes below 0.
    assert m["log_loss"] == pytest.approx(-math.log(np.finfo(np.float64).eps) / 3)
    assert point_metrics(y[:2], probs[:2])["log_loss"] == 0.0


def test_reliability_bins_one_bin_and_empty_top_bins() -> None:
    y, probs = random_predictions(50, 13)
    confidence = probs.max(axis=1)
    accuracy = float((probs.argmax(axis=1) == y).mean())
    one = reliability_bins(y, probs, n_bins=1)
    assert one["edges"] == [0.0, 1.0]
    assert one["count"] == [50]
    assert one["ece"] == pytest.approx(abs(accuracy - confidence.mean()))
    assert expected_calibration_error(y, probs, n_bins=1) == pytest.approx(one["ece"])
    assert expected_calibration_error(y, probs) != pytest.approx(one["ece"])
    # With 40 bins the highest are empty; the lists still have one entry per bin.
    many = reliability_bins(y, probs, n_bins=40)
    top = int(np.ceil(confidence.max() * 40))
    assert top < 40
    assert len(many["count"]) == len(many["accuracy"]) == len(many["confidence"]) == 40
    assert many["count"][top:] == [0] * (40 - top)
    assert many["accuracy"][top:] == many["confidence"][top:] == [None] * (40 - top)
    with pytest.raises(ValueError, match=r"^n_bins must be >= 1$"):
        reliability_bins(y, probs, n_bins=0)


def test_reliability_bins_empty_bins_are_silent() -> None:
    # Empty bins are None by design, so they must not spray RuntimeWarnings over a report run.
    y, probs = random_predictions(30, 14)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bins = reliability_bins(y, probs, n_bins=50)
    assert None in bins["accuracy"]


def test_roc_curve_known_values() -> None:
    # Scores .9 (positive), .5 (negative), .1 (positive): the lowest score is a positive.
    y = np.array([MEL, NV, MEL])
    probs = np.zeros((3, K))
    probs[:, MEL] = [0.9, 0.5, 0.1]
    probs[:, NV] = 1 - probs[:, MEL]
    fpr, tpr = roc_curve_points(y, probs, MEL)
    np.testing.assert_array_equal(fpr, [0.0, 0.0, 1.0, 1.0])
    np.testing.assert_array_equal(tpr, [0.0, 0.5, 0.5, 1.0])
    for one_class in (np.full(3, MEL), np.full(3, NV)):
        with pytest.raises(ValueError, match=r"^ROC needs both positive and negative samples$"):
            roc_curve_points(one_class, probs, MEL)


def test_bootstrap_interval_is_the_central_percentile_range() -> None:
    y, probs = random_predictions(40, 15)
    brier_per_image = ((probs - np.eye(K)[y]) ** 2).sum(axis=1)
    for alpha in (0.05, 0.2):
        result = bootstrap_metrics(y, probs, n_boot=200, seed=4, alpha=alpha)
        weights = draw_bootstrap_weights(40, 200, np.random.default_rng(4))
        replicates = weights @ brier_per_image / weights.sum(axis=1)
        expected = np.percentile(replicates, [100 * alpha / 2, 100 * (1 - alpha / 2)])
        assert result["intervals"]["brier"] == pytest.approx(expected.tolist(), rel=1e-12)
        assert result["alpha"] == alpha


def test_bootstrap_chunks_are_invisible(monkeypatch: pytest.MonkeyPatch) -> None:
    y, probs = random_predictions(50, 16)
    whole = bootstrap_metrics(y, probs, n_boot=10, seed=5)
    # 150 elements per chunk of 50 images: replicates drawn 3 + 3 + 3 + 1.
    monkeypatch.setattr(metrics_module, "_CHUNK_ELEMENTS", 150)
    chunked = bootstrap_metrics(y, probs, n_boot=10, seed=5)
    assert chunked["n_valid"] == whole["n_valid"]
    assert chunked["n_valid"]["accuracy"] == 10
    # Same replicates; only the summation order of the matrix products differs.
    for key in SCALARS:
        assert chunked["intervals"][key] == pytest.approx(whole["intervals"][key], rel=1e-12)


def test_bootstrap_defaults_and_no_replicates() -> None:
    y, probs = random_predictions(30, 17)
    default = bootstrap_metrics(y, probs)
    assert (default["n_boot"], default["seed"], default["alpha"]) == (1000, 0, 0.05)
    assert default["n_valid"]["accuracy"] == 1000
    assert default == bootstrap_metrics(y, probs, n_boot=1000, seed=0, alpha=0.05)
    none = bootstrap_metrics(y, probs, n_boot=0)
    for key in SCALARS:
        assert none["intervals"][key] is None
        assert none["n_valid"][key] == 0


def test_bootstrap_rejects_bad_arguments() -> None:
    y, probs = random_predictions(20, 18)
    message = r"^n_boot must be >= 0 and alpha in \(0, 1\)$"
    for kwargs in ({"n_boot": -1}, {"alpha": 0.0}, {"alpha": 1.0}, {"alpha": 1.5}):
        with pytest.raises(ValueError, match=message):
            bootstrap_metrics(y, probs, **{"n_boot": 5, **kwargs})
    with pytest.raises(ValueError, match=r"^probs must have shape \(n, 7\), got \(20, 6\)$"):
        bootstrap_metrics(y, probs[:, :6] / probs[:, :6].sum(axis=1, keepdims=True))
    with pytest.raises(ValueError, match=r"^groups must have shape \(20,\), got \(19,\)$"):
        bootstrap_metrics(y, probs, groups=np.arange(19), n_boot=5)


def test_evaluate_predictions_passes_everything_on() -> None:
    y, probs = random_predictions(60, 19)
    groups = np.arange(60) // 2
    report = evaluate_predictions(y, probs, groups=groups, mel_threshold=0.2, n_boot=30, seed=7)
    assert set(report) == {"n", "point", "ci95", "ci_n_valid", "n_boot", "seed", "bootstrap_unit"}
    assert report["point"] == point_metrics(y, probs, mel_threshold=0.2)
    boot = bootstrap_metrics(y, probs, groups=groups, mel_threshold=0.2, n_boot=30, seed=7)
    assert report["ci95"] == boot["intervals"]
    assert report["ci_n_valid"] == boot["n_valid"]
    assert report["ci_n_valid"]["mel"]["sensitivity_at_threshold"] > 0
    assert (report["n_boot"], report["seed"]) == (30, 7)
    default = evaluate_predictions(y, probs, n_boot=20)
    assert default["seed"] == 0
    assert default["ci95"] == bootstrap_metrics(y, probs, n_boot=20, seed=0)["intervals"]
    assert evaluate_predictions(y, probs)["n_boot"] == 1000


def test_single_negative_auroc_and_threshold_ties() -> None:
    # Two melanomas and one nevus: the melanoma AUROC rests on a single negative.
    y = np.array([MEL, MEL, NV])
    probs = np.zeros((3, K))
    probs[:, MEL] = [0.8, 0.3, 0.5]
    probs[:, NV] = 1 - probs[:, MEL]
    m = point_metrics(y, probs, mel_threshold=0.3)
    assert m["per_class"]["mel"]["auroc"] == pytest.approx(0.5)  # .8 beats .5, .3 does not
    assert m["per_class"]["nv"]["auroc"] == pytest.approx(0.5)
    # A score equal to the threshold is flagged: p_mel >= threshold.
    assert m["mel"]["sensitivity_at_threshold"] == 1.0
    assert m["mel"]["specificity_at_threshold"] == 0.0
    assert all(type(v) is int for row in m["confusion_matrix"] for v in row)
    # One non-melanoma (above) and one melanoma (here) are enough for specificity/sensitivity.
    one_mel = point_metrics(y[[0, 2]], probs[[0, 2]], mel_threshold=0.3)["mel"]
    assert one_mel == {  # the nevus at .5/.5 ties, and argmax takes the first class, mel
        "sensitivity_argmax": 1.0,
        "specificity_argmax": 0.0,
        "threshold": 0.3,
        "sensitivity_at_threshold": 1.0,
        "specificity_at_threshold": 0.0,
    }


def test_classes_without_melanoma_have_no_melanoma_metrics() -> None:
    y, probs = random_predictions(40, 20)
    names = [f"c{i}" for i in range(K)]
    m = point_metrics(y, probs, classes=names, mel_threshold=0.3)
    assert list(m["per_class"]) == names
    assert {key: m["mel"][key] for key in m["mel"] if key != "threshold"} == {
        "sensitivity_argmax": None,
        "specificity_argmax": None,
        "sensitivity_at_threshold": None,
        "specificity_at_threshold": None,
    }


def test_bootstrap_with_classes_missing_from_replicates_is_silent() -> None:
    # A single df image is missing from about a third of the replicates; its AUROC is then
    # undefined and skipped, without RuntimeWarnings.
    y, probs = random_predictions(40, 21, prior=(0, 0, 1, 0, 1, 1, 0))
    y[0] = CLASSES.index("df")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = bootstrap_metrics(y, probs, n_boot=50, seed=1)
    assert 0 < result["n_valid"]["per_class"]["df"]["auroc"] < 50


def test_input_checks_and_their_messages() -> None:
    y, probs = random_predictions(20, 22)
    y[:2] = [1, 5]  # odd class indices among the labels
    # Labels as whole floats are accepted; float32 probabilities are computed in float64.
    assert point_metrics(y.astype(np.float64), probs) == point_metrics(y, probs)
    as_float32 = probs.astype(np.float32)
    exact = point_metrics(y, as_float32.astype(np.float64))
    for key in ("brier", "log_loss", "ece"):
        assert point_metrics(y, as_float32)[key] == pytest.approx(exact[key], rel=1e-13)
    # One sample is enough.
    assert point_metrics(y[:1], probs[:1])["n"] == 1
    cases = [
        (y + 0.5, probs, r"^y_true must hold integer class indices$"),
        (y[:19], probs, r"^y_true must have shape \(20,\), got \(19,\)$"),
        (y[:, None], probs, r"^y_true must have shape \(20,\), got \(20, 1\)$"),
        (y[:0], probs[:0], r"^need at least one sample$"),
    ]
    bad_probs = probs.copy()
    bad_probs[0, :2] = [np.nan, np.inf]
    negative = probs.copy()
    negative[0, :2] += [-1.0, 1.0]  # still sums to 1
    cases += [
        (y, bad_probs, r"^probs contains NaN or inf$"),
        (y, negative, r"^probs rows must be non-negative and sum to 1 \(pass softmax outputs\)$"),
        (y, probs * 1.5, r"^probs rows must be non-negative and sum to 1"),
    ]
    for labels, p, message in cases:
        with pytest.raises(ValueError, match=message):
            point_metrics(labels, p)
    with pytest.raises(ValueError, match=r"^probs must have shape \(n, n_classes\), got \(20,\)$"):
        reliability_bins(y, probs[:, 0])


def test_absent_classes_are_silent() -> None:
    # Absent classes (melanoma among them) are None by design, without 0/0 RuntimeWarnings.
    y, probs = random_predictions(50, 23, prior=(0, 1, 1, 0, 0, 1, 0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = point_metrics(y, probs, mel_threshold=0.3)
    assert m["classes_absent"] == ["akiec", "df", "mel", "vasc"]
    assert m["mel"]["sensitivity_argmax"] is None
    assert m["mel"]["sensitivity_at_threshold"] is None
    assert m["mel"]["specificity_at_threshold"] is not None


def test_no_threshold_no_threshold_metrics() -> None:
    y, probs = random_predictions(50, 24)
    mel = point_metrics(y, probs)["mel"]
    assert mel["threshold"] is None
    assert mel["sensitivity_at_threshold"] is None
    assert mel["specificity_at_threshold"] is None
    assert mel["sensitivity_argmax"] is not None


def test_bootstrap_intervals_are_percentiles_of_resampled_point_metrics() -> None:
    y, probs = random_predictions(60, 25, prior=(1, 1, 1, 1, 2, 2, 1))
    n_boot, seed = 25, 6
    result = bootstrap_metrics(y, probs, mel_threshold=0.2, n_boot=n_boot, seed=seed)
    counts = draw_bootstrap_weights(60, n_boot, np.random.default_rng(seed))
    replicates = []
    for row in counts:
        index = np.repeat(np.arange(60), row.astype(int))
        replicates.append(point_metrics(y[index], probs[index], mel_threshold=0.2))

    def expected(values: list) -> list[float]:
        valid = [v for v in values if v is not None]
        return np.percentile(valid, [2.5, 97.5]).tolist()

    for key in ("accuracy", "brier", "log_loss"):
        assert result["intervals"][key] == pytest.approx(expected([r[key] for r in replicates]))
    for key in ("sensitivity_argmax", "specificity_argmax", "specificity_at_threshold"):
        values = [r["mel"][key] for r in replicates]
        assert result["intervals"]["mel"][key] == pytest.approx(expected(values))
