"""Shared test fixtures: the optional real data beside the repository, and tiny synthetic runs.

Real-data tests skip cleanly where ``../shared`` is absent, unless ``SKINLESION_REQUIRE_DATA=1``
(set by ``.ci/run``): then a missing copy fails them, so CI cannot pass by skipping them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from skinlesion.cli import main
from skinlesion.data.synthetic import make_synthetic_ham10000

# ``../shared`` beside the repository root: read-only, and absent on some machines.
SHARED_DATA = Path(__file__).parents[2] / "shared" / "data"
HAM_DIR = SHARED_DATA / "ham10000"
HAM_METADATA = HAM_DIR / "HAM10000_metadata.csv"
ISIC_DIR = SHARED_DATA / "isic2017"
REQUIRE_DATA = os.environ.get("SKINLESION_REQUIRE_DATA", "") not in ("", "0")


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


@pytest.fixture(scope="session")
def synthetic_ham(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``synthetic_ham(lesions_per_class=5, seed=0)``: a synthetic HAM10000 folder, made once
    per session for each (lesions_per_class, seed) and shared read-only by the tests."""
    made: dict[tuple[int, int], Path] = {}

    def get(lesions_per_class: int = 5, seed: int = 0) -> Path:
        key = (lesions_per_class, seed)
        if key not in made:
            root = tmp_path_factory.mktemp(f"syn_{lesions_per_class}_{seed}")
            make_synthetic_ham10000(root, lesions_per_class=lesions_per_class, seed=seed)
            made[key] = root
        return made[key]

    return get


@pytest.fixture(scope="session")
def syn_root(synthetic_ham: Callable[..., Path]) -> Path:
    """The default synthetic HAM10000 folder (5 lesions per class)."""
    return synthetic_ham(5)
