"""The fixed texts of a packaged model's card and LICENSE: intended use, known limits (which
depend on what the model was trained on) and the weights' licence."""

from __future__ import annotations

from typing import Any

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
    "taught only its own classes (masked loss). Figures on a source's own archive (e.g. its test "
    "split) are IN-DOMAIN, not an external validation.",
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
