"""Shared test fixtures: the optional real data beside the repository, and tiny synthetic runs.

Real-data tests skip cleanly where ``../shared`` is absent, unless ``SKINLESION_REQUIRE_DATA=1``
(set by ``.ci/run``): then a missing copy fails them, so CI cannot pass by skipping them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from skinlesion.cli import main
from skinlesion.data.synthetic import make_synthetic_ham10000

# ``../shared`` beside the repository root: read-only, and absent on some machines.
SHARED_DATA = Path(__file__).parents[2] / "shared" / "data"
HAM_DIR = SHARED_DATA / "ham10000"
HAM_METADATA = HAM_DIR / "HAM10000_metadata.csv"
ISIC_DIR = SHARED_DATA / "isic2017"
REQUIRE_DATA = os.environ.get("SKINLESION_REQUIRE_DATA", "") not in ("", "0")

BATCH_ATOL = 1e-6
"""float32 probabilities of one image computed in batches of other sizes or positions differ in
the last bits (kernels are picked by shape). ``tools/batch_tolerance.py`` prints it: on an AMD
EPYC (AVX2), eager PyTorch, at most 1.8e-7 for the packaged default and 1.1e-7 for the spread
model (onnxruntime: 0); with PyTorch's and oneDNN's kernels capped to other instruction sets
(``ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41``, and ``avx2``/``AVX``), 2.9e-7 and
1.7e-7. The bound leaves over three times the largest for CPUs not measured (AVX-512)."""


def _real_data_mark(present: bool, reason: str) -> pytest.MarkDecorator:
    """Skip where the data is absent; with SKINLESION_REQUIRE_DATA=1, run (and so fail) anyway."""
    return pytest.mark.skipif(not present and not REQUIRE_DATA, reason=reason)


requires_ham = _real_data_mark(HAM_METADATA.is_file(), f"real HAM10000 not found at {HAM_DIR}")
"""Mark for tests that read the real HAM10000 copy."""

requires_isic = _real_data_mark(
    (ISIC_DIR / "labels.csv").is_file(), f"ISIC 2017 not found at {ISIC_DIR}"
)
"""Mark for tests that read the real ISIC 2017 copy."""


def real_data_dir(path: Path, marker: Path, name: str) -> Path:
    """``path`` when ``marker`` exists; else skip, or fail under SKINLESION_REQUIRE_DATA=1."""
    if not marker.is_file():
        message = f"real {name} not found at {path}"
        if REQUIRE_DATA:
            pytest.fail(f"{message} (SKINLESION_REQUIRE_DATA=1)")
        pytest.skip(message)
    return path


@pytest.fixture(scope="session", autouse=True)
def session_cache(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """``$SKINLESION_CACHE`` for the session: tests never write to the user's cache (exported
    ONNX graphs, timm's name list), and every session starts with an empty one."""
    with pytest.MonkeyPatch.context() as mp:
        folder = tmp_path_factory.mktemp("skinlesion_cache")
        mp.setenv("SKINLESION_CACHE", str(folder))
        yield folder


@pytest.fixture
def ham_dir() -> Path:
    """The real HAM10000 folder; skips the test when it (or its metadata) is absent."""
    return real_data_dir(HAM_DIR, HAM_METADATA, "HAM10000")


# -- tiny synthetic runs through the real entry point ---------------------------------------------

# A fine-tune small enough for seconds on a CPU: random lite0 at 32 px, 2 folds, 3 short epochs.
FINETUNE: dict[str, Any] = {
    "data.image_size": 32,
    "cv.n_folds": 2,
    "model.backbone": "tf_efficientnet_lite0",
    "model.pretrained": "false",
    "train.epochs": 3,
    "train.batch_size": 8,
    "train.steps_per_epoch": 4,
    "train.patience": "null",
    "train.num_threads": 2,
    "eval.n_boot": 20,
}

# The linear probe on pretrained lite0 features (offline weights), 2 folds, no flips.
PROBE: dict[str, Any] = {
    "data.image_size": 32,
    "cv.n_folds": 2,
    "model.backbone": "tf_efficientnet_lite0",
    "model.pretrained": "true",
    "train.scheme": "linear_probe",
    "train.probe_flips": "false",
    "train.num_threads": 2,
    "eval.n_boot": 20,
}


def run_overrides(
    base: dict[str, Any], root: Path, out: Path, cache: Path, **extra: Any
) -> list[str]:
    """``key=value`` overrides: ``base`` with the data root, cache and output folder, then
    ``extra`` (keys with dots, so passed as ``**{"train.epochs": 1}``)."""
    merged = {**base, "data.root": root, "data.cache_dir": cache, "output_dir": out, **extra}
    return [f"{k}={v}" for k, v in merged.items()]


def train_cli(args: list[str]) -> int:
    """``skinlesion train --no-progress ARGS``; the exit code."""
    return main(["train", "--no-progress", *args])


def crash_on_call(monkeypatch: pytest.MonkeyPatch, n: int) -> Callable[[], None]:
    """The n-th training epoch of the process raises KeyboardInterrupt (a crash mid-run);
    returns the undo."""
    from skinlesion.training import fold_trainer

    real = fold_trainer.train_batches
    calls = {"n": 0}

    def crashing(*args: Any, **kwargs: Any) -> float:
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(fold_trainer, "train_batches", crashing)
    return lambda: monkeypatch.setattr(fold_trainer, "train_batches", real)


@pytest.fixture(scope="session")
def synthetic_ham(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``synthetic_ham(lesions_per_class=5, seed=0, **options)``: a synthetic HAM10000 folder,
    made once per session for each set of arguments and shared read-only by the tests;
    ``options`` go to :func:`make_synthetic_ham10000` (``weak_metadata``, ``colour_cast``,
    ``look_noise``)."""
    made: dict[tuple[Any, ...], Path] = {}

    def get(lesions_per_class: int = 5, seed: int = 0, **options: Any) -> Path:
        key = (lesions_per_class, seed, *sorted(options.items()))
        if key not in made:
            root = tmp_path_factory.mktemp(f"syn_{lesions_per_class}_{seed}")
            make_synthetic_ham10000(root, lesions_per_class=lesions_per_class, seed=seed, **options)
            made[key] = root
        return made[key]

    return get


def check_not_saturated(probs: np.ndarray, cap: float = 0.99, spread: float = 0.05) -> None:
    """Fail unless most rows' top probability is below ``cap`` and some class's probability
    varies across the rows by a standard deviation over ``spread``: a check of values on
    saturated or near-constant probabilities could not see a skew."""
    top = probs.max(axis=1)
    assert np.mean(top < cap) >= 0.9, f"saturated: {np.mean(top >= cap):.0%} of rows >= {cap}"
    assert probs.std(axis=0).max() > spread, f"near-constant: std {probs.std(axis=0).round(4)}"


# -- metrics recomputed independently (sklearn and plain loops) ----------------------------------

ABSENT_CLASS: dict[str, Any] = {
    "precision": None,
    "recall": None,
    "f1": None,
    "auroc": None,
    "support": 0,
    "absent": True,
}
"""A class with no image in the set, as the metrics report it: no figure, never 0."""


def clip_probs(probs: np.ndarray) -> np.ndarray:
    """The project clips p(true class) at machine epsilon (``LOG_LOSS_EPS``) for log loss, the
    floor sklearn uses too (a confident mistake below it was seen on ISIC 2017); sklearn also
    caps at 1 - eps, which changes a loss by under 1e-15. Clipping here first makes a comparison
    independent of sklearn's choice of floor."""
    from skinlesion.evaluation.metrics import LOG_LOSS_EPS

    return np.clip(probs, LOG_LOSS_EPS, 1.0)


def plain_ece(y: np.ndarray, probs: np.ndarray, n_bins: int = 15) -> float:
    """Plain-loop ECE over equal-width (lo, hi] top-class confidence bins."""
    conf, pred = probs.max(1), probs.argmax(1)
    total = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        in_bin = (conf > lo) & (conf <= hi) if b else conf <= hi
        if in_bin.any():
            total += abs((pred[in_bin] == y[in_bin]).mean() - conf[in_bin].mean()) * in_bin.sum()
    return total / len(y)


def check_point_against_sklearn(
    point: dict[str, Any], y: np.ndarray, probs: np.ndarray, tol: float = 1e-6
) -> None:
    """Every point figure of a metrics result (``point``: an out-of-fold report's or an
    evaluation's) recomputed from the labels ``y`` and probabilities ``probs`` (N, 7) with
    sklearn: macro averages over the classes present, per-class figures, confusion matrix."""
    from sklearn.metrics import (
        accuracy_score,
        balanced_accuracy_score,
        confusion_matrix,
        f1_score,
        log_loss,
        precision_score,
        recall_score,
        roc_auc_score,
    )

    from skinlesion.core.labels import CLASSES

    pred = probs.argmax(1)
    present = sorted(set(y.tolist()))
    labels = list(range(len(CLASSES)))
    assert point["n"] == len(y)
    assert point["classes_present"] == [CLASSES[c] for c in present]
    assert point["classes_absent"] == [c for i, c in enumerate(CLASSES) if i not in present]
    aurocs = [roc_auc_score(y == c, probs[:, c]) for c in present]
    onehot = np.eye(len(CLASSES))[y]
    expected = {
        "accuracy": accuracy_score(y, pred),
        "balanced_accuracy": balanced_accuracy_score(y, pred),
        "macro_f1": f1_score(y, pred, labels=present, average="macro", zero_division=0),
        "macro_auroc": float(np.mean(aurocs)),
        "log_loss": log_loss(y, clip_probs(probs), labels=labels),
        "brier": float(((probs - onehot) ** 2).sum(1).mean()),
        "ece": plain_ece(y, probs),
        "predicted_absent": float(np.isin(pred, present, invert=True).mean()),
    }
    for key, value in expected.items():
        assert point[key] == pytest.approx(value, abs=tol), key
    precision = precision_score(y, pred, labels=present, average=None, zero_division=0)
    recall = recall_score(y, pred, labels=present, average=None, zero_division=0)
    for i, c in enumerate(present):
        entry = point["per_class"][CLASSES[c]]
        assert entry["auroc"] == pytest.approx(aurocs[i], abs=tol), CLASSES[c]
        assert entry["precision"] == pytest.approx(precision[i], abs=tol), CLASSES[c]
        assert entry["recall"] == pytest.approx(recall[i], abs=tol), CLASSES[c]
        assert entry["support"] == int((y == c).sum()) and entry["absent"] is False
    assert point["confusion_matrix"] == confusion_matrix(y, pred, labels=labels).tolist()


@pytest.fixture(scope="session")
def syn_root(synthetic_ham: Callable[..., Path]) -> Path:
    """The default synthetic HAM10000 folder (5 lesions per class)."""
    return synthetic_ham(5)


def make_tiny_packaged(
    root: Path,
    name: str = "tiny",
    members: int = 2,
    size: int = 48,
    tta: int = 2,
    seed: int = 0,
    metadata: bool = False,
) -> Path:
    """A packaged model folder of random ``test_efficientnet`` members (no training): distinct
    classifier weights and temperatures per member, a reference with refer rules and a card.
    ``metadata=True``: members fused with age/sex/site (a 16-wide branch)."""
    import json

    import pandas as pd
    import torch

    from skinlesion.data.tabular import fit_metadata_spec
    from skinlesion.inference.packaged import CARD_FILE
    from skinlesion.inference.packaged_meta import (
        PACKAGED_FORMAT,
        WEIGHTS_FILE,
        sha256_file,
        write_packaged_meta,
    )
    from skinlesion.models.description import ModelDescription
    from skinlesion.models.factory import build_model, default_spec
    from skinlesion.publishing.card_text import INTENDED_USE, KNOWN_LIMITS
    from skinlesion.publishing.package import write_weights

    spec = default_spec("test_efficientnet", size)
    gen = torch.Generator().manual_seed(seed)
    table = pd.DataFrame(
        {"age": [30, 70], "sex": ["male", "female"], "localization": ["back", "face"]}
    )
    fused = fit_metadata_spec(table, ("age", "sex", "localization")) if metadata else None
    ckpts = []
    for fold in range(members):
        torch.manual_seed(seed + fold)
        model = build_model(
            "test_efficientnet",
            len(spec.class_names),
            pretrained=False,
            metadata=fused,
            metadata_hidden=16,
        )
        model.eval()
        clf = model.get_classifier()
        with torch.no_grad():
            clf.weight.copy_(torch.randn(clf.weight.shape, generator=gen) * 0.5)
            clf.bias.copy_(torch.randn(clf.bias.shape, generator=gen))
        ckpts.append({"fold": fold, "state_dict": model.state_dict()})
    out = root / name
    out.mkdir(parents=True, exist_ok=True)
    write_weights(ckpts, out / WEIGHTS_FILE)
    refer = {"confidence_threshold": 0.2, "ood_threshold": 1.9, "ood_quantile": 0.95}
    meta = {
        "format": PACKAGED_FORMAT,
        "format_version": 1,
        "name": name,
        "version": "0.0-test",
        **ModelDescription("test_efficientnet", spec).shared_dict(),
        "tta": tta,
        "members": [
            {
                "fold": c["fold"],
                "prefix": f"fold{c['fold']}.",
                "temperature": 1.0 + 0.5 * i,
                **ModelDescription("test_efficientnet", spec, {}, fused, 16).metadata_dict(),
            }
            for i, c in enumerate(ckpts)
        ],
        "reference": {
            "mel_threshold": 0.15,
            "domain": {"confidence_threshold": 0.2},
            "refer": refer,
        },
        "weights_sha256": sha256_file(out / WEIGHTS_FILE),
    }
    write_packaged_meta(out, meta)
    card = {"name": name, "intended_use": INTENDED_USE, "known_limits": KNOWN_LIMITS}
    (out / CARD_FILE).write_text(json.dumps(card))
    return out


@pytest.fixture(scope="session")
def tiny_packaged(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A packaged two-member model (48 px, TTA 2) of random weights, built once per session."""
    return make_tiny_packaged(tmp_path_factory.mktemp("tiny_zoo"))


def spread_images(folder: Path, n: int = 10) -> list[Path]:
    """``n`` synthetic lesions (PNG, lossless) on the same skin, from pale to dark: the images
    on which :func:`make_spread_packaged`'s p(mel) rises steeply."""
    import numpy as np
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, t in enumerate(np.linspace(0.0, 1.0, n)):
        colour = np.array([205, 160, 140]) * (1 - t) + np.array([50, 25, 35]) * t
        img = Image.new("RGB", (64, 48), (225, 190, 170))
        ImageDraw.Draw(img).ellipse((12, 6, 52, 42), fill=tuple(int(c) for c in colour))
        out.append(folder / f"lesion_{i:02d}.png")
        img.save(out[-1])
    return out


@pytest.fixture(scope="module")
def spread_imgs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """:func:`spread_images` (10), made once per test module that asks for them."""
    return spread_images(tmp_path_factory.mktemp("spread_imgs"))


@pytest.fixture(scope="module")
def spread_folder(tmp_path_factory: pytest.TempPathFactory, spread_imgs: list[Path]) -> Path:
    """:func:`make_spread_packaged` on ``spread_imgs``, built once per test module (module
    scope: a module that exports or refits it does not touch another module's copy)."""
    return make_spread_packaged(tmp_path_factory.mktemp("spread_zoo"), spread_imgs)


def _gap_midpoint(values: Any, low: float, high: float, gap: float = 0.02) -> float:
    """The midpoint of the first gap of at least ``gap`` between sorted ``values`` that lies
    within (low, high); fails the fixture when there is none."""
    import numpy as np

    s = np.sort(np.asarray(values))
    for a, b in zip(s[:-1], s[1:], strict=True):
        mid = (a + b) / 2
        if b - a >= gap and low < mid < high:
            return float(mid)
    raise AssertionError(f"no gap of {gap} in {s} between {low} and {high}")


def make_spread_packaged(root: Path, images: list[Path], name: str = "spread") -> Path:
    """A packaged model (two 48 px members, TTA 2) whose p(mel) on ``images``
    (:func:`spread_images`) rises from about 0.05 to 0.9 with the lesion's darkness, and whose
    card puts the melanoma threshold at about 0.3 (not 0.5), in a gap between the images'
    p(mel): some images are flagged, some not, and some lie between the threshold and 0.5.
    The refer rules likewise split the images (some referred, some not).

    Each member's mel logit is a linear read-out of its pooled features along the direction
    from the palest to the darkest image, so it moves by several units across the images; the
    other classes have constant logits (nv's the highest of them)."""
    import json

    import numpy as np
    import torch

    from skinlesion.core.labels import CLASSES
    from skinlesion.core.runtime import resolve_runtime
    from skinlesion.data.augment import normalize, to_float
    from skinlesion.data.preprocess import prepare_with_spec
    from skinlesion.inference.packaged import CARD_FILE, WEIGHTS_FILE, load_packaged, sha256_file
    from skinlesion.inference.packaged_meta import read_packaged_meta, write_packaged_meta
    from skinlesion.inference.refer import entropy
    from skinlesion.publishing.package import write_weights

    folder = make_tiny_packaged(root, name)
    model = load_packaged(folder, resolve_runtime("cpu"))
    spec = model.members[0].spec
    x = torch.from_numpy(np.stack([prepare_with_spec(p, spec) for p in images]))
    x = normalize(to_float(x), spec.normalization.mean, spec.normalization.std)
    mel = CLASSES.index("mel")
    ckpts = []
    for m in model.members:
        net = m.model
        with torch.no_grad():
            f = net.forward_head(net.forward_features(x), pre_logits=True).double()
            d = f[-1] - f[0]
            direction = d / (d @ d)  # (f - mean) @ direction runs about -0.45 .. 0.6
            clf = net.get_classifier()
            clf.weight.zero_()
            clf.bias.zero_()
            clf.weight[mel] = (6.0 * direction).float()
            clf.bias[mel] = float(1.2 - 6.0 * (f.mean(0) @ direction))
            clf.bias[CLASSES.index("nv")] = 0.4  # pale lesions: nv, not a tie
        ckpts.append({"fold": m.fold, "state_dict": net.state_dict()})
    write_weights(ckpts, folder / WEIGHTS_FILE)
    meta = read_packaged_meta(folder)
    meta["weights_sha256"] = sha256_file(folder / WEIGHTS_FILE)
    write_packaged_meta(folder, meta)

    probs, errors = load_packaged(folder, resolve_runtime("cpu")).predict_proba(images)
    assert not errors
    p_mel = probs[:, mel]
    threshold = _gap_midpoint(p_mel, 0.2, 0.4)
    assert (p_mel < threshold).sum() >= 2 and (p_mel >= 0.5).sum() >= 2
    assert ((p_mel >= threshold) & (p_mel < 0.5)).sum() >= 1
    top, ent = probs.max(1), entropy(probs)
    refer = {
        "confidence_threshold": _gap_midpoint(top, np.quantile(top, 0.3), 1.0, 0.005),
        "ood_threshold": _gap_midpoint(ent, np.quantile(ent, 0.7), np.inf, 0.005),
        "ood_quantile": 0.95,
    }
    meta["reference"] = {"mel_threshold": threshold, "refer": refer}
    write_packaged_meta(folder, meta)
    card = json.loads((folder / CARD_FILE).read_text())
    card["melanoma_threshold"] = threshold
    (folder / CARD_FILE).write_text(json.dumps(card))
    return folder


def lesion_images(folder: Path, n: int = 3, seed: int = 0) -> list[Path]:
    """``n`` real HAM10000 images when the shared copy is present, else synthetic lesions."""
    if HAM_DIR.is_dir():
        found = sorted((HAM_DIR / "HAM10000_images_part_1").glob("*.jpg"))[:n]
        if len(found) == n:
            return found
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        arr = rng.integers(150, 230, (150, 200, 3), dtype=np.uint8)
        img = Image.fromarray(arr)
        x, y = int(rng.integers(40, 120)), int(rng.integers(30, 80))
        ImageDraw.Draw(img).ellipse((x, y, x + 50, y + 40), fill=(90, 50, 40))
        out.append(folder / f"synthetic_{i}.jpg")
        img.save(out[-1], quality=92)
    return out


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels: a few dozen bytes that would
    decode into a huge image (the shape of a decompression bomb)."""

    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def png_bytes(w: int = 40, h: int = 30) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (w, h), (120, 80, 60)).save(buf, format="PNG")
    return buf.getvalue()


def attach_tiny_familiarity(folder: Path, train: list[Path], heldout: list[Path]) -> Path:
    """Fit each member of the packaged model in ``folder`` on ``train`` (its last third for the
    calibration) and ``heldout`` images, and add the familiarity to the package."""
    import numpy as np

    from skinlesion.core.runtime import resolve_runtime
    from skinlesion.data.preprocess import prepare_with_spec
    from skinlesion.inference.familiarity import fit_familiarity
    from skinlesion.inference.packaged import load_packaged
    from skinlesion.publishing.package import attach_familiarity
    from skinlesion.training.fit_familiarity import identity_statistics

    runtime = resolve_runtime("cpu")
    model = load_packaged(folder, runtime)
    spec = model.members[0].spec
    arr = np.stack([prepare_with_spec(p, spec) for p in [*train, *heldout]])
    cut, n = 2 * len(train) // 3, len(train)
    fams = {}
    for m in model.members:
        stats = identity_statistics(m.model, arr, np.arange(len(arr)), runtime, spec.normalization)
        parts = [[s[a:b] for s in stats] for a, b in ((0, cut), (cut, n), (n, len(arr)))]
        fams[f"fold{m.fold}."] = fit_familiarity(*parts)
    attach_familiarity(folder, fams)
    return folder


def make_csv_source(
    root: Path, per_class: dict[str, int], prefix: str = "ext", held_out: int = 1
) -> tuple[Path, Path]:
    """A tiny ``data.format: csv`` set in ``root``: tinted noise images (one tint a class, PNG)
    named ``<prefix>_<dx><i>``, and ``labels.csv`` (``image_id, dx, split``, no group column)
    where the last ``held_out`` images of each class have ``split == test``, the others
    ``train``. Returns the image folder and the labels file."""
    import pandas as pd
    from PIL import Image

    rng = np.random.default_rng(len(prefix))
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    for c, (dx, n) in enumerate(per_class.items()):
        for i in range(n):
            img = rng.integers(0, 80, (24, 32, 3), dtype=np.uint8)
            img[..., c % 3] += 150
            name = f"{prefix}_{dx}{i}"
            Image.fromarray(img).save(images / f"{name}.png")
            rows.append(
                {"image_id": name, "dx": dx, "split": "test" if i >= n - held_out else "train"}
            )
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    return images, root / "labels.csv"
