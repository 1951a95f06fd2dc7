"""Reading and validating the HAM10000 release: its label table plus image folders.

The release calls its label table ``HAM10000_metadata`` (lesion, image, diagnosis, and the
patient's age, sex and site); here it is the *labels file*, and "metadata" means the patient
fields alone (:mod:`skinlesion.data.tabular`).

Accepts the official layout (``HAM10000_metadata.csv`` or the ``.tab`` that Dataverse serves,
images in ``HAM10000_images_part_1/`` and ``_part_2/``) or any folder tree holding
``<image_id>.jpg``. Validation collects every problem before raising, so a user fixes a broken
download in one pass instead of one error at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd
from PIL import Image, UnidentifiedImageError

from skinlesion.core.errors import DataError
from skinlesion.core.labels import CLASSES

log = logging.getLogger(__name__)

REQUIRED_COLUMNS: tuple[str, ...] = ("lesion_id", "image_id", "dx")
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp")
LABELS_FILES: tuple[str, ...] = (
    "HAM10000_metadata.csv",
    "HAM10000_metadata.tab",
    "HAM10000_metadata",
)


def find_labels_file(root: Path) -> Path:
    """The labels file (``HAM10000_metadata``) of a HAM10000 folder (CSV preferred over the
    Dataverse ``.tab``)."""
    for name in LABELS_FILES:
        if (root / name).is_file():
            return root / name
    found = sorted(root.glob("*metadata*.csv")) + sorted(root.glob("*metadata*.tab"))
    if found:
        return found[0]
    raise DataError(
        f"no labels file in {root}",
        [f"expected one of {', '.join(LABELS_FILES)} (run `skinlesion download --dest {root}`)"],
    )


def read_table(path: Path) -> pd.DataFrame:
    """A CSV or a Dataverse ``.tab`` (tab-separated, quoted strings) as strings."""
    sep = "\t" if path.suffix == ".tab" else ","
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        df = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError as err:
        raise DataError(f"{path}: the file is empty (expected a header and rows)") from err
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise DataError(f"cannot parse {path}", [str(err)]) from err
    if df.empty:
        raise DataError(f"{path}: no rows under the header {list(df.columns)}")
    return df


def validate_labels(
    df: pd.DataFrame,
    source: str,
    classes: Sequence[str] = CLASSES,
    required: Sequence[str] = REQUIRED_COLUMNS,
) -> pd.DataFrame:
    """Check columns, labels and identifiers; return the table with clean string columns."""
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataError(
            f"{source}: wrong columns",
            [
                f"missing column(s) {missing}; found {list(df.columns)}; expected at least "
                f"{list(required)}"
            ],
        )
    df = df.copy()
    for col in required:
        df[col] = df[col].astype(str).str.strip()
    problems: list[str] = []
    known = set(classes)
    for i, row in enumerate(df.itertuples(index=False)):
        line = i + 2  # header is line 1
        rec = row._asdict()
        for col in required:
            if rec[col] == "":
                problems.append(f"line {line}: empty {col}")
        if "dx" in rec and rec["dx"] and rec["dx"] not in known:
            problems.append(
                f"line {line} (image {rec['image_id']}): unknown dx '{rec['dx']}', "
                f"expected one of {sorted(known)}"
            )
    dup = df["image_id"][df["image_id"].duplicated(keep=False) & (df["image_id"] != "")]
    for image_id in sorted(set(dup)):
        # Positions, not index labels: a frame passed in may not have a 0..n-1 index.
        lines = [str(i + 2) for i in (df["image_id"] == image_id).to_numpy().nonzero()[0]]
        problems.append(f"image_id {image_id} appears on lines {', '.join(lines)}")
    if "lesion_id" in required:
        per_lesion = df[df["dx"].isin(known)].groupby("lesion_id")["dx"].nunique()
        for lesion in per_lesion[per_lesion > 1].index:
            problems.append(
                f"lesion {lesion} has several diagnoses: "
                f"{sorted(set(df.loc[df['lesion_id'] == lesion, 'dx']))}"
            )
    if problems:
        raise DataError(f"{source}: invalid labels file", problems)
    return df


def read_labels(path: Path) -> pd.DataFrame:
    """Read and validate a HAM10000 labels file (``HAM10000_metadata.csv``)."""
    return validate_labels(read_table(path), str(path))


def index_images(root: Path, extensions: Iterable[str] = IMAGE_EXTENSIONS) -> dict[str, Path]:
    """Map image id (file stem) to path for every image under ``root``."""
    exts = {e.lower() for e in extensions}
    index: dict[str, Path] = {}
    dups: list[str] = []
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() in exts and path.is_file() and not path.name.startswith("."):
            if path.stem in index:
                dups.append(f"{path.stem}: {index[path.stem]} and {path}")
            else:
                index[path.stem] = path
    if dups:
        raise DataError(f"{root}: the same image id in several files", dups)
    return index


def check_image(path: Path) -> str | None:
    """``None`` if the file decodes as an image, else what is wrong with it.

    The whole image is decoded: a header check (``verify()``) passes a truncated JPEG that then
    fails after hours of work. A file over PIL's pixel limit (a decompression bomb) is refused.
    """
    try:
        with Image.open(path) as img:
            img.load()
    except Image.DecompressionBombError as err:
        return f"{path}: not a readable image, too many pixels ({err})"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        return f"{path}: not a readable image ({type(err).__name__}: {err})"
    return None


def attach_paths(
    df: pd.DataFrame, image_root: Path, source: str, verify: bool = True
) -> pd.DataFrame:
    """Add a ``path`` column; every referenced image must exist (and open, if ``verify``)."""
    index = index_images(image_root)
    paths = df["image_id"].map(index)
    problems = [
        f"line {i + 2}: image {image_id} not found under {image_root}"
        for i, image_id in enumerate(df["image_id"])
        if pd.isna(paths.iloc[i])
    ]
    if verify:
        problems += [p for p in (check_image(Path(x)) for x in paths.dropna()) if p]
    if problems:
        raise DataError(f"{source}: missing or unreadable images", problems)
    out = df.copy()
    out["path"] = paths.map(str)
    return out


def load_ham10000(
    root: str | Path, labels: str | Path | None = None, verify: bool = True
) -> pd.DataFrame:
    """The validated labels file of a HAM10000 folder (``labels``, default: found in ``root``)
    with a ``path`` column for each image.

    >>> df = load_ham10000("../shared/data/ham10000")  # doctest: +SKIP
    >>> df.columns[:3].tolist()  # doctest: +SKIP
    ['lesion_id', 'image_id', 'dx']
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(
            "data folder not found",
            [f"{root} does not exist (set data.root, or run `skinlesion download --dest {root}`)"],
        )
    labels_path = Path(labels) if labels else find_labels_file(root)
    df = read_labels(labels_path)
    df = attach_paths(df, root, str(labels_path), verify=verify)
    log.info("HAM10000: %d images, %d lesions from %s", len(df), df["lesion_id"].nunique(), root)
    return df.reset_index(drop=True)


def subset_by_lesion(df: pd.DataFrame, max_images: int | None, seed: int) -> pd.DataFrame:
    """A stratified subset of whole lesions holding about ``max_images`` images."""
    if max_images is None or max_images >= len(df):
        return df
    lesions = df.groupby("lesion_id", sort=True)["dx"].first()
    frac = max_images / len(df)
    picked = lesions.groupby(lesions, group_keys=False).apply(
        lambda s: s.sample(max(1, round(len(s) * frac)), random_state=seed)
    )
    out = df[df["lesion_id"].isin(set(picked.index))]
    return out.reset_index(drop=True)
