"""The HAM10000 diagnostic classes, in the order every model output uses."""

from collections.abc import Sequence

CLASSES: tuple[str, ...] = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
MELANOMA = "mel"
"""The melanoma class: the one the melanoma flag, threshold and AUROC are about."""

CLASS_DESCRIPTIONS: dict[str, str] = {
    "akiec": "actinic keratosis / intraepithelial carcinoma",
    "bcc": "basal cell carcinoma",
    "bkl": "benign keratosis-like lesion",
    "df": "dermatofibroma",
    "mel": "melanoma",
    "nv": "melanocytic nevus",
    "vasc": "vascular lesion",
}


def class_index(classes: Sequence[str]) -> dict[str, int]:
    """``{class name: output index}``, e.g. ``class_index(CLASSES)["mel"] == 4``."""
    return {c: i for i, c in enumerate(classes)}
