"""The texts of a packaged model's card and LICENSE: intended use, known limits (which depend
on what the model was trained on), the weights' licence, and the card rendered as Markdown."""

from __future__ import annotations

from typing import Any

from skinlesion.data.preprocess import Detail
from skinlesion.evaluation.cross_site import render_cross_site

INTENDED_USE = (
    "Research and education: studying dermoscopic image classification, domain shift and "
    "calibration. Not a medical device and not for diagnosis, triage or any clinical decision."
)
KNOWN_LIMITS = [
    "Trained on HAM10000 only (two sites, Vienna and Queensland, mostly fair skin): skin types "
    "IV-VI, acral and mucosal sites, and non-pigmented lesions are under-represented.",
    "Domain shift: other sites, dermatoscopes and framings lower accuracy and calibration; the "
    "ISIC 2017 figures in the model card show by how much on one external set. Check the domain "
    "indicators (`skinlesion evaluate`) before trusting the probabilities on new data.",
    "Seven HAM10000 diagnoses only: any other lesion is forced into one of them.",
    "The melanoma operating threshold was fixed at 95% out-of-fold specificity on HAM10000; its "
    "sensitivity and specificity elsewhere differ.",
]

LICENSE_TEXT = """\
The trained weights in this folder are licensed under the Creative Commons
Attribution-NonCommercial-ShareAlike 4.0 International licence (CC BY-NC-SA 4.0),
https://creativecommons.org/licenses/by-nc-sa/4.0/ , inherited from their training data:

  HAM10000: Tschandl P., Rosendahl C., Kittler H. "The HAM10000 dataset, a large collection of
  multi-source dermatoscopic images of common pigmented skin lesions". Sci. Data 5, 180161
  (2018), doi:10.1038/sdata.2018.161. Harvard Dataverse, doi:10.7910/DVN/DBW86T.

The ImageNet initialisation comes from the EfficientNet-Lite weights (Apache-2.0).
The skinlesion source code is licensed separately under Apache-2.0.
"""

MULTI_SOURCE_LIMITS = [
    "Trained on several labelled sources (see the training data): a source with fewer classes "
    "taught only its own classes (masked loss), so nothing kept its images out of the classes it "
    "lacks: on such a set, read the share 'predicted as a class the set lacks'. Figures on a "
    "source's own archive (e.g. its test split) are IN-DOMAIN, not an external validation.",
    "Domain shift: other sites, dermatoscopes and framings lower accuracy and calibration. Check "
    "the domain indicators (`skinlesion evaluate`) before trusting the probabilities on new data.",
    "Seven HAM10000 diagnoses only: any other lesion is forced into one of them.",
    "The melanoma operating threshold was fixed at 95% specificity on the out-of-fold images of "
    "all sources pooled; its sensitivity and specificity elsewhere differ.",
]


def known_limits(config: dict[str, Any]) -> list[str]:
    """The card's known limits for a run's resolved config (plain data): HAM10000's, or those of
    a run on several sources (``data.sources``)."""
    return MULTI_SOURCE_LIMITS if (config.get("data") or {}).get("sources") else KNOWN_LIMITS


LEE_2018 = (
    'Lee, Lee, Lee & Shin, "A simple unified framework for detecting out-of-distribution '
    'samples and adversarial attacks", NeurIPS 2018'
)


def _site_basis(basis: dict[str, Any] | None) -> str:
    """How a threshold set from held-out sources was set (``set_site_threshold``)."""
    if not basis:
        return ""
    sites = ", ".join(f"{s} {q:.3f}" for s, q in basis["sites"].items())
    return (
        f", times {basis['scale']:.3f}: the largest of the held-out sources' "
        f"{100 * (1 - basis['rate']):.0f}th percentiles under their cross-site models ({sites}), "
        f"so that about {100 * basis['rate']:.0f}% of another site's dermoscopy is called unlike"
    )


def _familiarity_line(card: dict[str, Any]) -> str:
    fam = card.get("familiarity")
    if not fam:
        return (
            '**Familiarity.** None fitted: no refer reason "unlike the training images" '
            "(`skinlesion fit-familiarity` adds one)."
        )
    parts = []
    for m in fam["members"]:
        parts.append(
            f"{m.get('prefix', '').rstrip('.') or 'model'}: Gaussians on {m.get('n_fit')} "
            f"training images, normalised on {m.get('n_calibration')} others, threshold at the "
            f"99th percentile of {m.get('n_heldout')} images ({m.get('heldout')})"
            + _site_basis(m.get("threshold_sites"))
        )
    return (
        '**Familiarity** (refer reason "unlike the training images"): feature-statistics '
        "Mahalanobis distance (per-channel mean and std of the last three stages, after "
        f"{fam.get('reference', LEE_2018)}); " + "; ".join(parts) + "."
    )


def _metadata_line(card: dict[str, Any]) -> str:
    meta = card.get("metadata")
    if not meta:
        return ""
    return (
        f" Fused with patient metadata ({', '.join(meta['fields'])}; whole-vector dropout "
        f"{meta.get('dropout')} in training): it predicts from the image alone when none is given."
    )


def _detail_line(spec: dict[str, Any]) -> str:
    """The detail larger inputs are reduced to, where the model has one."""
    if not spec.get("detail"):
        return "larger inputs taken at their own detail;"
    label = Detail(**spec["detail"]).label()
    return f"larger inputs first reduced to the training images' detail ({label});"


def _cross_site_lines(card: dict[str, Any]) -> str:
    """The figures of the recipe's cross-site run, where the card has them."""
    result = card.get("cross_site")
    if not result:
        return ""
    return "\n\n" + "\n".join(render_cross_site(result, len(card["members"])))


def _members_line(card: dict[str, Any]) -> str:
    members = card["members"]
    fits = [m["final_fit"] for m in members if "final_fit" in m]
    if not fits:
        return f"{len(members)} member(s) (folds {[m['fold'] for m in members]})"
    f = fits[0]
    return (
        f"one model trained on all {f.get('n_train', '?')} images for {f.get('epochs', '?')} "
        f"epochs (the median best epoch of folds {f.get('folds')}: {f.get('fold_best_epochs')}), "
        f"with their mean temperature {_fmt(f.get('temperature'))}. It has no held-out images "
        "of its own: the out-of-fold figures below are those of the same recipe's fold models"
    )


def _threshold_line(card: dict[str, Any]) -> str:
    if card.get("melanoma_threshold") is None:
        return "No melanoma operating threshold (the classes have no mel)."
    return (
        f"Melanoma operating threshold: p(mel) >= {card['melanoma_threshold']:.4f}\n"
        f"({card['melanoma_threshold_rule']})."
    )


def _hw(size: Any) -> str:
    h, w = (size, size) if isinstance(size, int) else size
    return f"{h}x{w}"


def _fmt(value: Any, ci: Any = None) -> str:
    if value is None:
        return "n/a"
    text = f"{value:.3f}"
    return f"{text} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else text


def render_card(card: dict[str, Any]) -> str:
    """The Markdown model card."""
    sets = card["metrics"]
    rows = [
        ("balanced accuracy", "balanced_accuracy"),
        ("macro AUROC", "macro_auroc"),
        ("macro F1", "macro_f1"),
        ("melanoma AUROC", "melanoma_auroc"),
        ("ECE", "ece"),
    ]
    if any(s.get("predicted_absent") is not None for s in sets.values()):
        rows.append(("predicted as a class the set lacks", "predicted_absent"))
    head = "| metric | " + " | ".join(sets) + " |\n|---|" + "---|" * len(sets) + "\n"
    body = "".join(
        f"| {label} | "
        + " | ".join(_fmt(s.get(key), s.get(f"{key}_ci95")) for s in sets.values())
        + " |\n"
        for label, key in rows
    )
    sizes = " | ".join(f"{s['n']} images" for s in sets.values())
    calib = card.get("calibration") or {}
    before, after = calib.get("before", {}), calib.get("after", {})
    spec = card["input"]
    limits = "".join(f"- {x}\n" for x in card["known_limits"])
    return f"""# Model card: {card["name"]}

**Intended use.** {card["intended_use"]}

**Weights licence.** CC BY-NC-SA 4.0 (see `LICENSE`), inherited from HAM10000; the skinlesion
code is Apache-2.0.

**Model.** {card["backbone"]}, ImageNet-initialised, fine-tuned; input {_hw(spec["size"])} (H x W)
({spec["interpolation"]}), Shades-of-Gray colour constancy: {spec["colour_constancy"]};
{_detail_line(spec)}
{_members_line(card)}; TTA over
{card["tta_views"]} dihedral views; temperature-scaled probabilities.{_metadata_line(card)}

**Training data.** {card["training_data"]} Trained on {card["hardware"]}.

**Metrics** (95% lesion-level bootstrap intervals where lesions are known; sizes: {sizes}):

{head}{body}
{_threshold_line(card)}{_cross_site_lines(card)}

{_familiarity_line(card)}

**Calibration** (out of fold): ECE {_fmt(before.get("ece"))} before and {_fmt(after.get("ece"))}
after temperature scaling; log loss {_fmt(before.get("log_loss"))} -> {_fmt(after.get("log_loss"))}.

**Known limits.**
{limits}
**Recipe.** The resolved configuration is in `card.json` (`recipe`).
"""
