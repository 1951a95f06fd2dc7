"""When to answer "refer to a person" instead of a class: two rules fitted on out-of-fold
predictions and stored with the model (``oof_metrics.json`` "refer", ``model.json`` "reference"),
and a third on the image's features, fitted with the model's familiarity (its own file).

1. **Low confidence:** the top calibrated probability is below the confidence threshold, the
   value under which :data:`CONFIDENCE_QUANTILE` of the out-of-fold images fall.
2. **Out of distribution:** the predictive entropy of the calibrated probabilities is beyond the
   :data:`OOD_QUANTILE` quantile of the out-of-fold entropies (only images the model has seen the
   like of produce a peaked answer over the seven classes). Entropy is used rather than energy
   because the run keeps probabilities, not logits; it looks at the whole distribution, where
   rule 1 looks at its top only.
3. **Unlike the training images:** the image's ``unfamiliarity`` (a distance in feature space to
   the training images, :mod:`skinlesion.inference.familiarity`, scaled so that 1 is the
   :data:`UNFAMILIAR_QUANTILE` quantile of held-out in-distribution images) is above 1. Unlike
   rules 1 and 2, it sees images that are not dermoscopy at all (photographs, screenshots,
   textures), on which a classifier may still answer with confidence. A model without a fitted
   familiarity has no such rule.

Example::

    ref = fit_refer_reference(oof_probs)
    refer, reasons = refer_decision(probs_row, ref, unfamiliarity=0.4)
"""

from __future__ import annotations

from typing import Any

import numpy as np

CONFIDENCE_QUANTILE = 0.10
OOD_QUANTILE = 0.95
OOD_SCORE = "entropy"
UNFAMILIAR_QUANTILE = 0.99
UNFAMILIAR_THRESHOLD = 1.0
UNFAMILIAR_REASON = "unlike the training images"
_REFERENCE_QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95, 0.99)


def entropy(probs: np.ndarray) -> np.ndarray:
    """Predictive entropy (nats) of each row of probabilities."""
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-12, 1.0)
    return -(p * np.log(p)).sum(axis=-1)


def fit_refer_reference(
    probs: np.ndarray,
    confidence_quantile: float = CONFIDENCE_QUANTILE,
    ood_quantile: float = OOD_QUANTILE,
) -> dict[str, Any]:
    """Thresholds of both rules and the out-of-fold distributions they come from."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or len(probs) == 0:
        raise ValueError(f"fit_refer_reference needs (N, C) probabilities, got {probs.shape}")
    conf, ent = probs.max(1), entropy(probs)
    return {
        "confidence_threshold": float(np.quantile(conf, confidence_quantile)),
        "confidence_quantile": confidence_quantile,
        "ood_score": OOD_SCORE,
        "ood_threshold": float(np.quantile(ent, ood_quantile)),
        "ood_quantile": ood_quantile,
        "ood_reference": {
            f"q{round(q * 100):02d}": float(np.quantile(ent, q)) for q in _REFERENCE_QUANTILES
        },
        "max_probability_reference": {
            f"q{round(q * 100):02d}": float(np.quantile(conf, q)) for q in _REFERENCE_QUANTILES
        },
        "n": len(probs),
    }


def refer_rules(reference: dict[str, Any] | None) -> dict[str, Any]:
    """The refer thresholds of a model's reference; older references without a "refer" entry
    fall back to the out-of-fold confidence threshold alone."""
    reference = reference or {}
    if reference.get("refer"):
        return reference["refer"]
    threshold = (reference.get("domain") or {}).get("confidence_threshold")
    return {} if threshold is None else {"confidence_threshold": float(threshold)}


def refer_decision(
    probs: np.ndarray, rules: dict[str, Any], unfamiliarity: float | None = None
) -> tuple[bool, list[str]]:
    """Whether one image's calibrated probabilities (C,) should be referred, and why;
    ``unfamiliarity`` (``None`` or NaN: the model has no familiarity) adds rule 3."""
    reasons = []
    top = float(np.max(probs))
    conf = rules.get("confidence_threshold")
    if conf is not None and top < conf:
        reasons.append(
            f"low confidence: top probability {top:.3f} is below the model's threshold {conf:.3f}"
        )
    ood = rules.get("ood_threshold")
    if ood is not None:
        score = float(entropy(probs))
        if score > ood:
            reasons.append(
                f"out of distribution: entropy {score:.3f} is beyond the out-of-fold "
                f"{round(rules.get('ood_quantile', OOD_QUANTILE) * 100)}th percentile {ood:.3f}"
            )
    if unfamiliarity is not None and unfamiliarity > UNFAMILIAR_THRESHOLD:
        reasons.append(
            f"{UNFAMILIAR_REASON}: feature distance {unfamiliarity:.2f} is beyond the held-out "
            f"{round(UNFAMILIAR_QUANTILE * 100)}th percentile ({UNFAMILIAR_THRESHOLD:.2f})"
        )
    return bool(reasons), reasons


def refer_mask(
    probs: np.ndarray, rules: dict[str, Any], unfamiliarity: np.ndarray | None = None
) -> np.ndarray:
    """Vectorised :func:`refer_decision`: True where an image is referred."""
    probs = np.asarray(probs, dtype=np.float64)
    mask = np.zeros(len(probs), dtype=bool)
    if unfamiliarity is not None:
        mask |= np.asarray(unfamiliarity, dtype=np.float64) > UNFAMILIAR_THRESHOLD
    if rules.get("confidence_threshold") is not None:
        mask |= probs.max(1) < rules["confidence_threshold"]
    if rules.get("ood_threshold") is not None:
        mask |= entropy(probs) > rules["ood_threshold"]
    return mask


def reason_kind(reason: str) -> str:
    """The rule a reason of :func:`refer_decision` comes from: the text before its colon."""
    return reason.partition(":")[0]


def refer_summary(
    probs: np.ndarray, rules: dict[str, Any], unfamiliarity: np.ndarray | None = None
) -> dict[str, Any]:
    """The share of images referred, overall and by rule (an image may have several reasons),
    from :func:`refer_decision` itself."""
    probs = np.asarray(probs, dtype=np.float64)
    u = [None] * len(probs) if unfamiliarity is None else [float(v) for v in unfamiliarity]
    kinds = ["low confidence", "out of distribution"]
    if unfamiliarity is not None:
        kinds.append(UNFAMILIAR_REASON)
    counts = dict.fromkeys(kinds, 0)
    referred = 0
    for p, v in zip(probs, u, strict=True):
        refer, reasons = refer_decision(p, rules, None if v is None or np.isnan(v) else v)
        referred += refer
        for r in reasons:
            counts[reason_kind(r)] = counts.get(reason_kind(r), 0) + 1
    n = max(len(probs), 1)
    return {
        "n": len(probs),
        "rate": referred / n,
        "by_reason": {k: c / n for k, c in counts.items()},
    }
