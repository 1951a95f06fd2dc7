"""Risk-coverage: accuracy on the accepted images against the share referred."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from skinlesion.evaluation.refer_figures import (
    plot_risk_coverage,
    render_risk_coverage,
    risk_coverage,
)


def _example() -> tuple[np.ndarray, np.ndarray]:
    # Ten images; the five most confident are right, the five least confident are all wrong.
    conf = np.linspace(0.95, 0.5, 10)
    probs = np.stack([conf, 1 - conf], axis=1)
    y = np.array([0] * 5 + [1] * 5)
    return y, probs


def test_known_values() -> None:
    y, probs = _example()
    rows = risk_coverage(y, probs, coverages=(1.0, 0.5))
    full, half = rows
    assert full["share_referred"] == 0.0 and full["accuracy_accepted"] == pytest.approx(0.5)
    assert full["balanced_accuracy_accepted"] == pytest.approx(0.5)
    assert half["share_referred"] == pytest.approx(0.5) and half["accuracy_accepted"] == 1.0
    assert half["n_accepted"] == 5 and half["confidence_threshold"] == pytest.approx(0.75)


def test_model_rules_row_and_table(tmp_path: Path) -> None:
    y, probs = _example()
    rows = risk_coverage(y, probs, {"confidence_threshold": 0.79}, coverages=(1.0,))
    own = rows[-1]
    assert own["operating_point"] == "model's refer rules"
    assert own["n_accepted"] == int((probs.max(1) >= 0.79).sum()) == 4
    assert own["accuracy_accepted"] == 1.0
    lines = render_risk_coverage(rows)
    assert (
        len(lines) == 2 + len(rows)
        and "| model's refer rules | 0.790 | 60.0 | 100.0 |" in lines[-1]
    )
    path = plot_risk_coverage(y, probs, tmp_path / "rc.png")
    assert Image.open(path).size[0] > 100


def test_nothing_accepted_is_not_a_number() -> None:
    y, probs = _example()
    (row,) = risk_coverage(y, probs, coverages=(0.0,))
    assert row["n_accepted"] == 0 and row["accuracy_accepted"] is None


def test_out_of_fold_report_fits_the_refer_rules(tmp_path: Path) -> None:
    import json

    import pandas as pd

    from skinlesion.core.labels import CLASSES
    from skinlesion.evaluation.report import write_oof_report
    from skinlesion.inference.refer import fit_refer_reference

    rng = np.random.default_rng(0)
    n = 140
    y = np.arange(n) % len(CLASSES)
    logits = rng.normal(0, 1, (n, len(CLASSES)))
    logits[np.arange(n), y] += rng.uniform(0, 4, n)  # right more often when confident
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    table = pd.DataFrame(probs, columns=list(CLASSES))
    table.insert(0, "image_id", [f"ISIC_{i:07d}" for i in range(n)])
    table.insert(1, "lesion_id", [f"HAM_{i:07d}" for i in range(n)])
    table.insert(2, "dx", [CLASSES[k] for k in y])
    table.insert(3, "fold", np.arange(n) % 2)
    table["prediction"] = [CLASSES[k] for k in probs.argmax(1)]
    for fold, part in table.groupby("fold"):
        (tmp_path / f"fold_{fold}").mkdir()
        part.to_csv(tmp_path / f"fold_{fold}" / "val_predictions.csv", index=False)
    result = write_oof_report(tmp_path, n_boot=20)
    saved = pd.read_csv(tmp_path / "oof_predictions.csv")
    expected = fit_refer_reference(saved[list(CLASSES)].to_numpy(np.float64))
    saved_refer = json.loads((tmp_path / "oof_metrics.json").read_text())["refer"]
    for key in ("confidence_threshold", "ood_threshold"):
        assert result["refer"][key] == pytest.approx(expected[key], abs=1e-6)
        assert saved_refer[key] == pytest.approx(expected[key], abs=1e-6)
    rows = result["risk_coverage"]
    assert rows[0]["share_referred"] == 0.0 and rows[-1]["operating_point"] == "model's refer rules"
    # Referring the least confident images raises accuracy on the rest in this data.
    assert rows[-2]["accuracy_accepted"] > rows[0]["accuracy_accepted"]
    assert "risk_coverage.png" in result["plots"]
    assert (tmp_path / "plots" / "risk_coverage.png").is_file()
    assert "| answer top 90% by confidence |" in (tmp_path / "report.md").read_text()
