"""Running the cross-site yardstick (:mod:`skinlesion.evaluation.yardstick`) for a recipe: the
cross-site run holding out HAM10000's sites, and for a recipe that does not train on ISIC 2017
the model trained on all of HAM10000 (fold 0's split: its validation images choose the epoch
and temperature) evaluated on ISIC 2017's test split on images alone. Every step resumes.
With several seeds the recipe is trained once per seed: the config's own seed in the folder
itself, each other seed N in its ``seed_N/``.

Example::

    run_yardstick("configs/ham10000_cpu160_5fold.yaml", "runs/yardstick/c160", resume=True)
    run_yardstick("configs/ham10000_cpu160_5fold.yaml", "runs/yardstick/c160", seeds=[42, 7])
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from skinlesion.core.config import Config, load_config
from skinlesion.core.errors import ConfigError
from skinlesion.core.run_folder import RunFolder
from skinlesion.evaluation.external import evaluate_external
from skinlesion.evaluation.prediction_files import EVALUATION_PREDICTIONS
from skinlesion.evaluation.yardstick import (
    CROSS_SITE_DIR,
    ISIC_SET,
    YARDSTICK_FILE,
    YARDSTICK_SITES,
    seed_dir,
    write_yardstick,
    yardstick_score,
)
from skinlesion.training.cv import run_cv

log = logging.getLogger(__name__)

ALL_SITES_DIR = "all"


def trains_on(cfg: Config, images: Path) -> bool:
    """Whether the config's data reads images from ``images`` (then that set is in-domain)."""
    target = images.resolve()
    folders = [cfg.data.images, cfg.data.root]
    folders += [f for s in cfg.data.sources or () for f in (s.images, s.root)]
    return any(f is not None and Path(f).resolve() == target for f in folders)


def cross_site_overrides(output: Path, sites: Sequence[str] = YARDSTICK_SITES) -> list[str]:
    """The overrides that turn a recipe into its yardstick's cross-site run."""
    return [
        "cv.holdout_column=dataset",
        f"cv.holdout=[{','.join(sites)}]",
        "cv.folds_to_run=null",
        f"output_dir={output / CROSS_SITE_DIR}",
    ]


def run_yardstick(
    config: str | Path | None,
    output: str | Path,
    overrides: Sequence[str] = (),
    isic2017: str | Path | None = "../shared/data/isic2017",
    resume: bool = False,
    progress: bool = True,
    seeds: Sequence[int] = (),
) -> dict[str, Any]:
    """Train and predict what the recipe's yardstick needs in ``output``, once per seed (none
    given: the config's seed); its score over all the folder's runs."""
    output = Path(output)
    own = load_config(config, overrides).seed
    if seeds and any(o.split("=", 1)[0].strip() == "seed" for o in overrides):
        raise ConfigError("yardstick: give seeds with --seeds or seed=N, not both")
    for seed in dict.fromkeys(seeds or [own]):
        where = output if seed == own else seed_dir(output, seed)
        extra = [] if seed == own else [f"seed={seed}"]
        log.info("yardstick run with seed %d in %s", seed, where)
        _one_run(config, [*overrides, *extra], where, isic2017, resume, progress)
    score = yardstick_score(output)
    write_yardstick(score, output / YARDSTICK_FILE)
    return score


def _one_run(
    config: str | Path | None,
    overrides: Sequence[str],
    output: Path,
    isic2017: str | Path | None,
    resume: bool,
    progress: bool,
) -> None:
    """One training run of the recipe: the cross-site run, and ISIC 2017 test where it is
    outside the recipe's training data."""
    cross = load_config(config, [*overrides, *cross_site_overrides(output)])
    run_cv(cross, resume=_started(cross, resume), progress=progress)
    isic = Path(isic2017) if isic2017 is not None else None
    if isic is not None and trains_on(cross, isic / "images"):
        log.info("the recipe trains on %s: ISIC 2017 test is in-domain, not in its yardstick", isic)
    elif isic is not None:
        _isic_leg(config, overrides, output, isic, resume, progress)


def _started(cfg: Config, resume: bool) -> bool:
    """``resume`` where the run was started: a first yardstick run with --resume starts it."""
    return resume and RunFolder(Path(cfg.output_dir)).config.is_file()


def _isic_leg(
    config: str | Path | None,
    overrides: Sequence[str],
    output: Path,
    isic: Path,
    resume: bool,
    progress: bool,
) -> None:
    """The all-HAM10000 model's predictions of ISIC 2017 test (kept if already there)."""
    evaluated = output / ISIC_SET
    if resume and (evaluated / EVALUATION_PREDICTIONS).is_file():
        log.info("%s already evaluated", evaluated)
        return
    full = load_config(
        config, [*overrides, "cv.folds_to_run=[0]", f"output_dir={output / ALL_SITES_DIR}"]
    )
    run_dir = run_cv(full, resume=_started(full, resume), progress=progress)
    evaluate_external(
        run_dir,
        isic / "labels.csv",
        isic / "images",
        evaluated,
        where={"split": "test"},
        progress=progress,
        use_metadata=False,
    )
