"""Join runs that trained different folds of one recipe (in parallel, on other machines) into
one run folder, as if the folds had run together."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from skinlesion.core.errors import DataError, OutputError
from skinlesion.core.run_folder import RunFolder, recipe_of
from skinlesion.data.folds import read_folds
from skinlesion.evaluation.report import write_oof_report


def _read_parts(parts: Sequence[RunFolder]) -> tuple[list[dict[str, Any]], list[pd.DataFrame]]:
    """Each part's saved config and folds; every part must be a run folder."""
    configs, folds = [], []
    for run in parts:
        for path in (run.config, run.folds):
            if not path.is_file():
                raise DataError(f"{run.root}: no {path.name}; is this a skinlesion run folder?")
        configs.append(run.read_config_tree())
        folds.append(read_folds(run.folds).sort_values("image_id").reset_index(drop=True))
    return configs, folds


def _finished_folds(parts: Sequence[RunFolder]) -> dict[str, RunFolder]:
    """``fold_K`` folder name -> the part holding it; each finished, none in two parts."""
    seen: dict[str, RunFolder] = {}
    for run in parts:
        for fold in run.fold_folders():
            if not fold.finished:
                raise DataError(f"{fold.root} did not finish (no summary.json); resume it first")
            if fold.root.name in seen:
                raise DataError(
                    f"{fold.root.name} is in both {seen[fold.root.name].root} and {run.root}"
                )
            seen[fold.root.name] = run
    if not seen:
        raise DataError("no finished folds in the given runs")
    return seen


def merge_runs(parts: Sequence[str | Path], out: str | Path, n_boot: int = 1000) -> Path:
    """Copy each part's finished folds into ``out``; refuse mismatched recipes or folds."""
    runs = [RunFolder(Path(p)) for p in parts]
    target = RunFolder(Path(out))
    if target.root.exists() and any(target.root.iterdir()):
        raise OutputError(f"{target.root} exists and is not empty; merge into a new folder")
    configs, folds = _read_parts(runs)
    for run, cfg, f in zip(runs[1:], configs[1:], folds[1:], strict=True):
        if recipe_of(cfg) != recipe_of(configs[0]):
            raise DataError(
                f"{run.root} was trained with another recipe than {runs[0].root}; compare "
                f"their config.yaml"
            )
        if not f.equals(folds[0]):
            raise DataError(f"{run.root} used other folds than {runs[0].root} (folds.csv differs)")
    seen = _finished_folds(runs)
    target.root.mkdir(parents=True, exist_ok=True)
    for name, run in seen.items():
        shutil.copytree(run.root / name, target.root / name)
    merged = json.loads(json.dumps(configs[0]))
    merged["cv"]["folds_to_run"] = sorted(int(n.split("_")[1]) for n in seen)
    merged["output_dir"] = str(target.root)
    target.config.write_text(yaml.safe_dump(merged, sort_keys=False))
    shutil.copy(runs[0].folds, target.folds)
    if runs[0].dataset.is_file():
        shutil.copy(runs[0].dataset, target.dataset)
    env = {
        str(run.root): json.loads(run.environment.read_text())
        for run in runs
        if run.environment.is_file()
    }
    target.environment.write_text(json.dumps({"merged_from": env}, indent=2))
    write_oof_report(target.root, n_boot=n_boot)
    return target.root
