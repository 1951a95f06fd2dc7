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

from skinlesion.evaluation.report import write_oof_report

# Keys that may differ between the parts: where each wrote and which folds it ran, and
# machine-specific settings that do not change the recipe (the image cache is only a cache).
_PER_PART = (
    ("cv", "folds_to_run"),
    ("output_dir",),
    ("train", "device"),
    ("train", "num_threads"),
    ("data", "cache_dir"),
)


def _comparable(cfg: dict[str, Any]) -> dict[str, Any]:
    out = json.loads(json.dumps(cfg))
    for path in _PER_PART:
        node = out
        for key in path[:-1]:
            node = node.get(key, {})
        node.pop(path[-1], None)
    return out


def merge_runs(parts: Sequence[str | Path], out: str | Path, n_boot: int = 1000) -> Path:
    """Copy each part's finished folds into ``out``; refuse mismatched recipes or folds."""
    parts = [Path(p) for p in parts]
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; merge into a new folder")
    configs, folds = [], []
    for p in parts:
        for name in ("config.yaml", "folds.csv"):
            if not (p / name).is_file():
                raise FileNotFoundError(f"{p}: no {name}; is this a skinlesion run folder?")
        configs.append(yaml.safe_load((p / "config.yaml").read_text()))
        folds.append(
            pd.read_csv(p / "folds.csv", dtype=str).sort_values("image_id").reset_index(drop=True)
        )
    for p, cfg, f in zip(parts[1:], configs[1:], folds[1:], strict=True):
        if _comparable(cfg) != _comparable(configs[0]):
            raise ValueError(
                f"{p} was trained with another recipe than {parts[0]}; compare their config.yaml"
            )
        if not f.equals(folds[0]):
            raise ValueError(f"{p} used other folds than {parts[0]} (folds.csv differs)")
    seen: dict[str, Path] = {}
    for p in parts:
        for fold_dir in sorted(p.glob("fold_*")):
            if not (fold_dir / "summary.json").is_file():
                raise ValueError(f"{fold_dir} did not finish (no summary.json); resume it first")
            if fold_dir.name in seen:
                raise ValueError(f"{fold_dir.name} is in both {seen[fold_dir.name]} and {p}")
            seen[fold_dir.name] = p
    if not seen:
        raise ValueError("no finished folds in the given runs")
    out.mkdir(parents=True, exist_ok=True)
    for name, p in seen.items():
        shutil.copytree(p / name, out / name)
    merged = json.loads(json.dumps(configs[0]))
    merged["cv"]["folds_to_run"] = sorted(int(n.split("_")[1]) for n in seen)
    merged["output_dir"] = str(out)
    (out / "config.yaml").write_text(yaml.safe_dump(merged, sort_keys=False))
    shutil.copy(parts[0] / "folds.csv", out / "folds.csv")
    env = {
        str(p): json.loads((p / "environment.json").read_text())
        for p in parts
        if (p / "environment.json").is_file()
    }
    (out / "environment.json").write_text(json.dumps({"merged_from": env}, indent=2))
    write_oof_report(out, n_boot=n_boot)
    return out
