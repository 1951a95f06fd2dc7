"""Refer rules: thresholds fitted as out-of-fold quantiles, decisions with their reasons."""

from __future__ import annotations

import numpy as np
import pytest

from skinlesion.inference.refer import (
    entropy,
    fit_refer_reference,
    refer_decision,
    refer_mask,
    refer_rules,
    refer_summary,
)


def test_entropy_known_values() -> None:
    assert entropy(np.array([1.0, 0.0, 0.0])) == pytest.approx(0.0, abs=1e-9)
    assert entropy(np.full(7, 1 / 7)) == pytest.approx(np.log(7))


def test_fit_takes_quantiles_of_the_out_of_fold_predictions() -> None:
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(7) * 0.5, size=1000)
    ref = fit_refer_reference(probs)
    assert ref["confidence_threshold"] == pytest.approx(np.quantile(probs.max(1), 0.10))
    assert ref["ood_threshold"] == pytest.approx(np.quantile(entropy(probs), 0.95))
    # By construction about 10% of the OOF images fall below the confidence threshold and
    # about 5% beyond the OOD threshold.
    assert (probs.max(1) < ref["confidence_threshold"]).mean() == pytest.approx(0.10, abs=0.002)
    assert (entropy(probs) > ref["ood_threshold"]).mean() == pytest.approx(0.05, abs=0.002)
    assert ref["n"] == 1000 and ref["ood_score"] == "entropy"


def test_decision_names_each_rule_that_fired() -> None:
    rules = {"confidence_threshold": 0.5, "ood_threshold": 1.0, "ood_quantile": 0.95}
    sure = np.array([0.9, 0.05, 0.05])
    assert refer_decision(sure, rules) == (False, [])
    unsure = np.array([0.4, 0.35, 0.25])
    refer, reasons = refer_decision(unsure, rules)
    assert refer and len(reasons) == 2
    assert "0.400 is below the model's threshold 0.500" in reasons[0]
    assert "out of distribution" in reasons[1] and "95th percentile" in reasons[1]
    flat_top = np.array([0.55, 0.15, 0.15, 0.15])  # confident enough, but spread out
    refer, reasons = refer_decision(flat_top, rules)
    assert refer and reasons[0].startswith("out of distribution")
    batch = np.stack([sure, unsure[:3], np.array([0.55, 0.3, 0.15])])
    expected = [refer_decision(p, rules)[0] for p in batch]
    assert refer_mask(batch, rules).tolist() == expected


def test_rules_of_older_references_fall_back_to_the_confidence_threshold() -> None:
    assert refer_rules(None) == {}
    assert refer_rules({"domain": {"confidence_threshold": 0.3}}) == {"confidence_threshold": 0.3}
    rules = {"confidence_threshold": 0.2, "ood_threshold": 1.5}
    assert refer_rules({"refer": rules, "domain": {"confidence_threshold": 0.3}}) == rules


def test_unfamiliarity_rule_in_the_mask_and_the_summary() -> None:
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(7) * 0.5, size=400)
    rules = fit_refer_reference(probs)
    u = rng.lognormal(-0.5, 0.6, size=400)
    u[::50] = np.nan  # no value (e.g. no familiarity for those): no reason from it
    values = [None if np.isnan(v) else float(v) for v in u]
    decided = [refer_decision(p, rules, v) for p, v in zip(probs, values, strict=True)]
    mask = refer_mask(probs, rules, u)
    assert mask.tolist() == [d[0] for d in decided]
    assert (mask & ~refer_mask(probs, rules)).sum() > 10  # referred for their features alone
    summary = refer_summary(probs, rules, u)
    assert summary["rate"] == pytest.approx(mask.mean())
    assert summary["by_reason"] == pytest.approx(
        {
            "low confidence": (probs.max(1) < rules["confidence_threshold"]).mean(),
            "out of distribution": (entropy(probs) > rules["ood_threshold"]).mean(),
            "unlike the training images": (u > 1).mean(),
        }
    )
    assert "unlike the training images" not in refer_summary(probs, rules)["by_reason"]
