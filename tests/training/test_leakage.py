"""Leakage audit: paired bootstrap of random-split minus lesion-grouped metrics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from conftest import PROBE, run_overrides

from skinlesion.core.config import load_config
from skinlesion.core.labels import CLASSES
from skinlesion.evaluation.metrics import point_metrics
from skinlesion.training.leakage import AUDIT_METRICS, audit_leakage, paired_inflation

K = len(CLASSES)
HIGHER_IS_BETTER = ("balanced_accuracy", "macro_f1", "accuracy", "macro_auroc")


def hand_data(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels, lesion ids (two images per lesion) and weakly informative probabilities."""
    rng = np.random.default_rng(seed)
    lesion_class = np.repeat(np.arange(K), 8)  # 8 lesions per class
    y = np.repeat(lesion_class, 2)
    groups = np.repeat(np.arange(len(lesion_class)), 2).astype(str)
    probs = rng.dirichlet(np.ones(K), size=len(y))
    probs[np.arange(len(y)), y] += 0.3
    return y, groups, probs / probs.sum(1, keepdims=True)


def write_fake_oof(cfg: Any, probs: np.ndarray) -> Path:
    """What a run of ``cfg`` leaves for the audit: hand-made OOF predictions in its folder."""
    y, groups, _ = hand_data()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame({"image_id": [f"img{i:03d}" for i in range(len(y))]})
    df["lesion_id"], df["dx"] = groups, [CLASSES[i] for i in y]
    df["fold"] = np.arange(len(y)) % 2 if not cfg.cv.grouped else y % 2
    df[list(CLASSES)] = probs
    df["prediction"] = [CLASSES[i] for i in probs.argmax(1)]
    df.sample(frac=1, random_state=0).to_csv(out / "oof_predictions.csv", index=False)
    return out


def test_identical_predictions_have_zero_inflation() -> None:
    y, groups, probs = hand_data()
    result = paired_inflation(y, probs, probs.copy(), groups, n_boot=100, seed=1, classes=CLASSES)
    assert set(result) == {
        *AUDIT_METRICS,
        "mel_auroc",
        "mel_sensitivity_argmax",
        "mel_sensitivity_at_spec95",
    }
    for name, r in result.items():
        assert r["inflation"] == 0.0, name
        assert r["ci95"] == [0.0, 0.0], name
        assert r["lesion_grouped"] == r["image_random"]
        assert 0 < r["n_valid"] <= 100


def test_perfect_leaky_predictions_are_inflated() -> None:
    y, groups, noisy = hand_data()
    perfect = np.full_like(noisy, 0.02 / (K - 1))
    perfect[np.arange(len(y)), y] = 0.98
    result = paired_inflation(y, perfect, noisy, groups, n_boot=200, seed=0, classes=CLASSES)
    clean, leaky = (
        point_metrics(y, noisy, classes=CLASSES),
        point_metrics(y, perfect, classes=CLASSES),
    )
    for name in HIGHER_IS_BETTER:
        r = result[name]
        assert r["lesion_grouped"] == pytest.approx(clean[name])
        assert r["image_random"] == pytest.approx(leaky[name]) == pytest.approx(1.0)
        assert r["inflation"] == pytest.approx(leaky[name] - clean[name])
        assert r["inflation"] > 0 and r["ci95"][0] > 0, name
        assert r["ci95"][0] <= r["inflation"] <= r["ci95"][1]
    # Lower is better: leakage shows as a negative difference.
    for name in ("log_loss",):
        assert result[name]["inflation"] < 0 and result[name]["ci95"][1] < 0
    # Swapping the roles flips the sign.
    swapped = paired_inflation(y, noisy, perfect, groups, n_boot=200, seed=0, classes=CLASSES)
    assert swapped["accuracy"]["inflation"] == pytest.approx(-result["accuracy"]["inflation"])


def test_bootstrap_resamples_whole_lesions() -> None:
    """Duplicating every image of a lesion (same prediction) must not narrow the interval when
    the resampling unit is the lesion: the set has no more independent information."""
    y, groups, noisy = hand_data()
    perfect = np.eye(K)[y] * 0.9 + 0.1 / K
    single = paired_inflation(
        y[::2], perfect[::2], noisy[::2], groups[::2], 300, seed=3, classes=CLASSES
    )
    dup = paired_inflation(
        np.repeat(y[::2], 4), np.repeat(perfect[::2], 4, 0), np.repeat(noisy[::2], 4, 0),
        np.repeat(groups[::2], 4), 300, seed=3, classes=CLASSES,
    )  # fmt: skip
    for name in ("accuracy", "balanced_accuracy"):
        assert dup[name]["inflation"] == pytest.approx(single[name]["inflation"])
        assert dup[name]["ci95"] == pytest.approx(single[name]["ci95"])


@pytest.fixture(scope="module")
def audit(tmp_path_factory: pytest.TempPathFactory, syn_root: Path) -> tuple[Path, dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("leakage")
    # cv.folds_to_run=[0]: the audit must run every fold regardless.
    overrides = run_overrides(
        PROBE, syn_root, tmp / "audit", tmp / "cache", **{"cv.folds_to_run": "[0]"}
    )
    cfg = load_config(None, overrides)
    result = audit_leakage(cfg, n_boot=50, progress=False)
    return tmp / "audit", result


def test_audit_writes_both_schemes(audit: tuple[Path, dict[str, Any]], syn_root: Path) -> None:
    out, result = audit
    assert json.loads((out / "leakage.json").read_text()) == result
    md = (out / "leakage.md").read_text()
    assert md.startswith("# Leakage audit: tf_efficientnet_lite0 (linear_probe, 32 px, 2 folds)")
    assert "| metric | lesion-grouped | image-random | inflation [95% CI] |" in md
    assert result["bootstrap"] == {"unit": "lesion", "n_boot": 50, "paired": True}
    oof = {
        s: pd.read_csv(out / s / "oof_predictions.csv", dtype={"image_id": str})
        for s in ("lesion_grouped", "image_random")
    }
    meta = pd.read_csv(syn_root / "HAM10000_metadata.csv", dtype=str)
    for scheme, df in oof.items():
        assert sorted(df["image_id"]) == sorted(meta["image_id"]), scheme
        assert sorted(df["fold"].unique()) == [0, 1], scheme
    assert result["n_images"] == len(meta)
    assert result["n_lesions"] == meta["lesion_id"].nunique()
    # Each reported value is the point metric of that scheme's OOF predictions.
    for scheme, df in oof.items():
        y = df["dx"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy()
        expected = point_metrics(y, df[list(CLASSES)].to_numpy(np.float64), classes=CLASSES)
        for name in AUDIT_METRICS:
            got = result["metrics"][name]
            assert got[scheme] == pytest.approx(expected[name], abs=1e-9), (scheme, name)
            assert got["inflation"] == pytest.approx(got["image_random"] - got["lesion_grouped"])
            assert got["n_valid"] > 0 and got["ci95"][0] <= got["ci95"][1]
            assert f"| {name} | {got['lesion_grouped']:.3f} | {got['image_random']:.3f} |" in md


def test_only_the_random_split_splits_lesions(audit: tuple[Path, dict[str, Any]]) -> None:
    out, result = audit
    grouped = pd.read_csv(out / "lesion_grouped" / "folds.csv")
    random = pd.read_csv(out / "image_random" / "folds.csv")
    assert grouped.groupby("lesion_id")["fold"].nunique().max() == 1
    split = int((random.groupby("lesion_id")["fold"].nunique() > 1).sum())
    assert split > 0
    assert result["lesions_split_across_folds_in_random_split"] == split
    grouped, random = (f.sort_values("image_id").reset_index(drop=True) for f in (grouped, random))
    assert grouped["image_id"].tolist() == random["image_id"].tolist()
    assert (grouped["fold"] != random["fold"]).any()


def test_audit_runs_each_scheme_on_all_folds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The audit's own logic, with training replaced by hand-made OOF predictions."""
    from skinlesion.training import cv as training

    y, groups, noisy = hand_data()
    perfect = np.eye(K)[y] * 0.9 + 0.1 / K
    calls = []

    def fake_run_cv(cfg: Any, resume: bool = False, progress: bool = True) -> Path:
        calls.append((cfg.cv.grouped, cfg.cv.folds_to_run, cfg.cv.folds_file, cfg.output_dir))
        return write_fake_oof(cfg, noisy if cfg.cv.grouped else perfect)

    monkeypatch.setattr(training, "run_cv", fake_run_cv)
    cfg = load_config(
        None,
        [
            f"output_dir={tmp_path}",
            "cv.folds_to_run=[1]",
            f"cv.folds_file={tmp_path / 'folds.csv'}",
            "eval.n_boot=30",
        ],
    )
    result = audit_leakage(cfg, n_boot=0, progress=False)
    assert calls == [
        (True, None, None, str(tmp_path / "lesion_grouped")),
        (False, None, None, str(tmp_path / "image_random")),
    ]
    assert cfg.cv.folds_to_run == [1] and cfg.cv.grouped  # the caller's config is untouched
    assert result["n_images"] == len(y) and result["n_lesions"] == len(set(groups))
    # Lesions have two images; the fake random split puts them in folds 0 and 1.
    assert result["lesions_split_across_folds_in_random_split"] == len(set(groups))
    # n_boot=0 means no resamples (point values only), not "the config's default".
    assert result["bootstrap"]["n_boot"] == 0
    ba = result["metrics"]["balanced_accuracy"]
    assert ba["ci95"] is None and ba["n_valid"] == 0
    assert ba["image_random"] == 1.0
    assert ba["inflation"] == pytest.approx(
        1.0 - point_metrics(y, noisy, classes=CLASSES)["balanced_accuracy"]
    )
    assert "| balanced_accuracy |" in (tmp_path / "leakage.md").read_text()


def test_audit_resume_continues_the_part_it_holds_and_starts_the_other(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Interrupted after the lesion-grouped run: --resume continues that one and starts the
    image-random one (which has no folder yet); into a folder with neither it is an error."""
    from skinlesion.core.errors import ConfigError
    from skinlesion.training import cv as training

    _, _, probs = hand_data()
    resumed = {}

    def fake_run_cv(cfg: Any, resume: bool = False, progress: bool = True) -> Path:
        resumed[Path(cfg.output_dir).name] = resume
        return write_fake_oof(cfg, probs)

    monkeypatch.setattr(training, "run_cv", fake_run_cv)
    out = tmp_path / "audit"
    cfg = load_config(None, [f"output_dir={out}", "eval.n_boot=0"])
    with pytest.raises(ConfigError, match=f"output_dir: {out} does not exist"):
        audit_leakage(cfg, resume=True, progress=False)
    assert not resumed and not out.exists()
    (out / "lesion_grouped").mkdir(parents=True)
    (out / "lesion_grouped" / "config.yaml").write_text("")
    audit_leakage(cfg, resume=True, progress=False)
    assert resumed == {"lesion_grouped": True, "image_random": False}
