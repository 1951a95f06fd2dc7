"""Write the golden outputs of a packaged model: the answers it gives for 16 real HAM10000
images, stored as ``golden.json`` in its folder, which ``tests/inference/test_golden.py`` holds
every entry point to (the CLI on both backends, ``load_model().predict`` and the service).

The images are two of each class and two more melanomas, the first by image id; a fused model
gets metadata that covers the edges: age 0 and a missing age, unknown sex, and a site from every
general-site group (hand, foot, acral, unknown among them). Run it after packaging a model:

    python tools/golden_outputs.py ham10000-lite0-160-meta-ens3 --data ../shared/data/ham10000
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pandas as pd

import skinlesion
from skinlesion.core.labels import CLASSES
from skinlesion.data.ham10000 import load_ham10000
from skinlesion.inference.packaged import MODEL_FILE, zoo_dir

GOLDEN_FILE = "golden.json"
SITES = (
    "hand", "foot", "acral", "unknown", "back", "chest", "face", "scalp",
    "upper extremity", "lower extremity", "abdomen", "genital", "neck", "trunk", "ear", "back",
)  # fmt: skip
AGES = (
    0.0,
    None,
    35.0,
    80.0,
    55.0,
    5.0,
    60.0,
    None,
    70.0,
    45.0,
    85.0,
    20.0,
    50.0,
    65.0,
    40.0,
    30.0,
)
SEXES = ("unknown", "male", "female", None) * 4


def golden_images(ham: Path) -> pd.DataFrame:
    """Two images of each class and two more melanomas, the first by image id; with metadata."""
    df = load_ham10000(ham, None).sort_values("image_id")
    picks = [df[df["dx"] == c].head(4 if c == "mel" else 2) for c in CLASSES]
    table = pd.concat(picks).reset_index(drop=True)
    return table.assign(age=list(AGES), sex=list(SEXES), localization=list(SITES))


def golden_record(row: pd.Series) -> dict[str, Any]:
    return {k: (None if pd.isna(row[k]) else row[k]) for k in ("age", "sex", "localization")}


def _answers(table: pd.DataFrame, classes: list[str]) -> list[dict[str, Any]]:
    return [
        {
            "probabilities": {c: float(out[c]) for c in classes},
            "melanoma_flag": None if pd.isna(out["melanoma_flag"]) else bool(out["melanoma_flag"]),
            "unfamiliarity": None if pd.isna(out["unfamiliarity"]) else float(out["unfamiliarity"]),
            "refer": bool(out["refer"]),
        }
        for _, out in table.iterrows()
    ]


def write_golden(folder: Path, ham: Path) -> Path:
    """``golden.json``: per image its id, label, metadata (a fused model's), the answers given
    that metadata (``given``) and given the image alone (``image_only``)."""
    model = skinlesion.load_model(folder, device="cpu", backend="torch")
    images = golden_images(ham)
    paths = images["path"].tolist()
    alone = _answers(model.predict(paths), model.class_names)
    given = alone
    if model.uses_metadata:
        records = [golden_record(r) for _, r in images.iterrows()]
        given = _answers(model.predict(paths, metadata=records), model.class_names)
    rows = [
        {
            "image_id": img["image_id"],
            "dx": img["dx"],
            "metadata": golden_record(img) if model.uses_metadata else None,
            "given": g,
            "image_only": a,
        }
        for (_, img), g, a in zip(images.iterrows(), given, alone, strict=True)
    ]
    path = folder / GOLDEN_FILE
    path.write_text(json.dumps({"model": folder.name, "tta": model.tta, "images": rows}, indent=2))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="packaged model name or folder")
    ap.add_argument("--data", default="../shared/data/ham10000", help="the HAM10000 folder")
    args = ap.parse_args()
    folder = Path(args.model)
    if not (folder / MODEL_FILE).is_file():
        folder = zoo_dir() / args.model
    print(write_golden(folder, Path(args.data)))


if __name__ == "__main__":
    main()
