"""The cross-site score that every recipe decision is judged by, and its paired comparison.

A recipe's yardstick folder holds the predictions of sets from sites its models never trained on,
all on images alone:

- ``cross_site/``: a cross-site run (``cv.holdout_column=dataset``) holding out HAM10000's
  :data:`YARDSTICK_SITES`, each predicted by the model trained on the other sites;
- ``isic2017_test/``: ``skinlesion evaluate`` of ISIC 2017's test split by the model trained on
  all of HAM10000, for a recipe that does not train on ISIC 2017 (for one that does, that set is
  in-domain and leaves the yardstick);
- ``seed_N/``: the same recipe trained again with ``seed=N``, laid out as above. Each folder is
  one training run; the recipe's figure on a set is the mean over its runs.

:func:`write_ensemble` makes a yardstick folder of an ensemble: the mean of the calibrated
probabilities of every run of several folders (seeds of one recipe, or diverse recipes), on the
sets all of them predicted. It is one run, so it cannot win until it has company.

The score is the mean melanoma AUROC and the mean balanced accuracy over the sets. Two recipes are
compared on the sets every run of both has, image by image: each set's lesions are resampled on
their own (1000 times), and in each resample the runs of each recipe are drawn with replacement
too (a two-level bootstrap), so the 95% interval of each set's and of the mean's difference
covers both the test images' sampling and training randomness. A candidate **wins** when its mean
melanoma AUROC gains with an interval above 0, its mean balanced accuracy does not lose with an
interval below 0, no single set loses on either figure with an interval below 0, and both recipes
have at least :data:`MIN_RUNS` runs: a recipe retrained with another seed alone has moved melanoma
AUROC by 0.024 with an interval below 0 (docs/results.md), so one run per recipe cannot decide.
With two runs the run-level draw is coarse and tends to be narrow; more seeds make it honest.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from skinlesion.core.errors import DataError
from skinlesion.core.labels import MELANOMA, class_index
from skinlesion.core.run_folder import RunFolder
from skinlesion.evaluation.metrics import draw_bootstrap_weights, replicate_metrics
from skinlesion.evaluation.prediction_files import (
    EVALUATION_PREDICTIONS,
    RAW_PREFIX,
    PredictionFile,
    labelled_predictions,
    read_predictions,
    write_predictions,
)

YARDSTICK_SITES: tuple[str, ...] = ("rosendahl", "vidir_modern")
"""HAM10000's acquisition sites held out one at a time: each has hundreds of melanomas."""
ISIC_SET = "isic2017_test"
CROSS_SITE_DIR = "cross_site"
FIGURES: tuple[str, ...] = ("mel_auroc", "balanced_accuracy")
YARDSTICK_FILE = "yardstick.json"
MEMBERS_FILE = "members.json"
SEED_DIR = re.compile(r"^seed_(\d+)$")
MIN_RUNS = 2
"""Training runs per recipe below which a comparison cannot declare a win."""


def seed_dir(output: Path, seed: int) -> Path:
    """Where the recipe's run with ``seed=N`` lives inside its yardstick folder."""
    return output / f"seed_{seed}"


def _has_sets(folder: Path) -> bool:
    return (
        RunFolder(folder / CROSS_SITE_DIR).oof_predictions.is_file()
        or (folder / ISIC_SET / EVALUATION_PREDICTIONS).is_file()
    )


def yardstick_runs(folder: str | Path) -> list[Path]:
    """The training runs of a yardstick folder: itself where it holds predictions, then each
    ``seed_N/`` that does, by N."""
    folder = Path(folder)
    seeds = [p for p in folder.glob("seed_*") if SEED_DIR.match(p.name) and _has_sets(p)]
    seeds.sort(key=lambda p: int(p.name.removeprefix("seed_")))
    runs = ([folder] if _has_sets(folder) else []) + seeds
    if not runs:
        raise DataError(
            f"{folder}: no yardstick predictions",
            [
                f"expected {RunFolder(folder / CROSS_SITE_DIR).oof_predictions} (a cross-site run)"
                f" or {folder / ISIC_SET / EVALUATION_PREDICTIONS} (an evaluation), in the folder"
                " or in a seed_N/ inside it"
            ],
        )
    return runs


def yardstick_sets(run: str | Path) -> dict[str, PredictionFile]:
    """The labelled predictions of each set of one training run's folder, by set name."""
    run = Path(run)
    sets: dict[str, PredictionFile] = {}
    oof = RunFolder(run / CROSS_SITE_DIR).oof_predictions
    if oof.is_file():
        saved = read_predictions(oof)
        for site, part in saved.table.groupby("site", sort=True):
            sets[str(site)] = replace(saved, table=part.reset_index(drop=True))
    evaluated = run / ISIC_SET / EVALUATION_PREDICTIONS
    if evaluated.is_file():
        saved = read_predictions(evaluated)
        if "lesion_id" not in saved.table.columns:
            saved.table["lesion_id"] = saved.table["image_id"]
        sets[ISIC_SET] = saved
    return sets


def recipe_sets(folder: str | Path) -> tuple[dict[str, list[PredictionFile]], list[str]]:
    """Each set that every run of the folder predicted, with one prediction file per run; and
    the sets only some runs have (left out)."""
    per_run = [yardstick_sets(run) for run in yardstick_runs(folder)]
    names = sorted(set().union(*per_run))
    common = [s for s in names if all(s in sets for sets in per_run)]
    return {s: [sets[s] for sets in per_run] for s in common}, [s for s in names if s not in common]


def _replicates(
    table: pd.DataFrame, classes: Sequence[str], weights: np.ndarray
) -> dict[str, np.ndarray]:
    """Melanoma AUROC and balanced accuracy of the point estimate (row 0) and each replicate."""
    y = table["dx"].map(class_index(classes)).to_numpy()
    values = replicate_metrics(
        y, table[list(classes)].to_numpy(np.float64), weights, classes=classes
    )
    return {
        "mel_auroc": values[f"auroc.{MELANOMA}"],
        "balanced_accuracy": values["balanced_accuracy"],
    }


def _interval(values: np.ndarray) -> list[float] | None:
    valid = values[np.isfinite(values)]
    return [float(v) for v in np.percentile(valid, [2.5, 97.5])] if valid.size else None


def yardstick_score(folder: str | Path) -> dict[str, Any]:
    """Each set's melanoma AUROC and balanced accuracy (the mean over the folder's runs, and each
    run's) and their means over the sets."""
    sets, left_out = recipe_sets(folder)
    per_set = {}
    for name, runs in sets.items():
        n = len(runs[0].table)
        points = [_replicates(saved.table, list(saved.classes), np.ones((1, n))) for saved in runs]
        per_set[name] = {
            "n": n,
            **{k: float(np.mean([p[k][0] for p in points])) for k in FIGURES},
            "runs": {k: [float(p[k][0]) for p in points] for k in FIGURES},
        }
    mean = {k: float(np.mean([s[k] for s in per_set.values()])) for k in FIGURES}
    runs = [str(r) for r in yardstick_runs(folder)]
    return {
        "folder": str(folder),
        "runs": runs,
        "left_out": left_out,
        "sets": per_set,
        "mean": mean,
    }


def _aligned(
    name: str,
    reference: PredictionFile,
    other: PredictionFile,
    columns: Sequence[str] | None = None,
) -> pd.DataFrame:
    """``dx`` and ``other``'s ``columns`` (default: its class probabilities) in ``reference``'s
    row order, after checking that both predicted the same labelled images with the same
    classes."""
    classes = list(reference.classes)
    if list(other.classes) != classes:
        raise DataError(f"set {name}: classes differ", [f"{classes} vs {list(other.classes)}"])
    a, b = reference.table, other.table
    both = a[["image_id", "dx"]].merge(b, on="image_id", suffixes=("", "_b"), validate="1:1")
    if len(both) != len(a) or len(both) != len(b) or (both["dx"] != both["dx_b"]).any():
        raise DataError(
            f"set {name}: the two folders did not predict the same labelled images",
            [f"{len(a)} and {len(b)} images, {len(both)} in common"],
        )
    return both[["dx", *(classes if columns is None else columns)]]


def _paired_set(
    runs_a: Sequence[PredictionFile],
    runs_b: Sequence[PredictionFile],
    name: str,
    n_boot: int,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """Per figure and side, each run's (1 + n_boot,) values on one set, stacked (runs, 1 + n_boot):
    column 0 the point estimate, the rest one lesion draw shared by every run of both sides."""
    reference = runs_a[0]
    classes = list(reference.classes)
    weights = np.vstack(
        [
            np.ones(len(reference.table)),
            draw_bootstrap_weights(len(reference.table), n_boot, rng, reference.table["lesion_id"]),
        ]
    )
    out = {}
    for side, runs in (("a", runs_a), ("b", runs_b)):
        values = [_replicates(_aligned(name, reference, r), classes, weights) for r in runs]
        out.update({f"{k}.{side}": np.stack([v[k] for v in values]) for k in FIGURES})
    return out


def _run_means(values: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """(1 + n_boot,) values: column 0 the mean over all runs, then each resample's mean over its
    drawn runs (``draws``: (n_boot, k) run indices)."""
    columns = np.arange(1, values.shape[1])[:, None]
    return np.concatenate([[values[:, 0].mean()], values[draws, columns].mean(axis=1)])


def _difference(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    d = b - a
    return {"a": float(a[0]), "b": float(b[0]), "difference": float(d[0]), "ci95": _interval(d[1:])}


def compare_yardsticks(
    folder_a: str | Path, folder_b: str | Path, n_boot: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """B minus A on the sets both folders have (see the module's docstring for the rule)."""
    (sets_a, out_a), (sets_b, out_b) = recipe_sets(folder_a), recipe_sets(folder_b)
    common = [s for s in sets_a if s in sets_b]
    if not common:
        raise DataError(
            f"{folder_a} and {folder_b} share no yardstick set",
            [f"A: {sorted(sets_a)}; B: {sorted(sets_b)}"],
        )
    rng = np.random.default_rng(seed)
    drawn = {s: _paired_set(sets_a[s], sets_b[s], s, n_boot, rng) for s in common}
    n_runs = {"a": len(sets_a[common[0]]), "b": len(sets_b[common[0]])}
    # One run draw per resample for every set: a run is one training of the recipe, all sets.
    draws = {side: rng.integers(0, k, size=(n_boot, k)) for side, k in n_runs.items()}
    means = {
        s: {
            f"{k}.{side}": _run_means(v[f"{k}.{side}"], draws[side])
            for k in FIGURES
            for side in n_runs
        }
        for s, v in drawn.items()
    }
    per_set = {
        s: {k: _difference(v[f"{k}.a"], v[f"{k}.b"]) for k in FIGURES} for s, v in means.items()
    }
    mean = {
        k: _difference(
            np.mean([v[f"{k}.a"] for v in means.values()], axis=0),
            np.mean([v[f"{k}.b"] for v in means.values()], axis=0),
        )
        for k in FIGURES
    }
    left_out = sorted((set(sets_a) ^ set(sets_b)) | set(out_a) | set(out_b))
    return {
        "a": str(folder_a),
        "b": str(folder_b),
        "runs": n_runs,
        "sets": common,
        "left_out": left_out,
        "n_boot": n_boot,
        "seed": seed,
        "per_set": per_set,
        "mean": mean,
        "verdict": verdict(per_set, mean, n_runs),
    }


def _below(ci: list[float] | None) -> bool:
    return ci is not None and ci[1] < 0


def verdict(
    per_set: dict[str, Any], mean: dict[str, Any], runs: dict[str, int] | None = None
) -> str:
    """``wins``, or why not (the rule of the module's docstring). ``runs``: training runs per
    side (``{"a": k, "b": k}``); left out, the run count is not checked."""
    losses = [f"{s} {k}" for s, f in per_set.items() for k in FIGURES if _below(f[k]["ci95"])]
    if losses:
        return "does not win: loses on " + ", ".join(losses)
    if _below(mean["balanced_accuracy"]["ci95"]):
        return "does not win: the mean balanced accuracy loses"
    ci = mean["mel_auroc"]["ci95"]
    if ci is None or ci[0] <= 0:
        return "does not win: the mean melanoma AUROC gain's interval reaches 0"
    few = [side.upper() for side, k in (runs or {}).items() if k < MIN_RUNS]
    if few:
        return (
            f"cannot win yet: one training run of {' and '.join(few)}, so the interval leaves out"
            f" training randomness (add runs with --seeds; {MIN_RUNS} or more each)"
        )
    return "wins"


def render_yardstick_comparison(result: dict[str, Any]) -> str:
    """A Markdown table: each set's and the mean's figures for A and B, and B - A [95% CI]."""
    runs = result.get("runs", {"a": 1, "b": 1})
    lines = [
        f"A = {result['a']} ({runs['a']} run(s)), B = {result['b']} ({runs['b']} run(s));"
        f" sets: {', '.join(result['sets'])}"
        + (
            f" (left out, not in every run: {', '.join(result['left_out'])})"
            if result["left_out"]
            else ""
        )
        + f"; B - A with a 95% paired interval ({result['n_boot']} resamples of lesions"
        + (" and runs)." if max(runs.values()) > 1 else ")."),
        "",
        "| set | mel AUROC A | mel AUROC B | B - A [95% CI] | bal acc A | bal acc B "
        "| B - A [95% CI] |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    rows = [*result["per_set"].items(), ("mean", result["mean"])]
    for name, f in rows:
        cells = []
        for k in FIGURES:
            v = f[k]
            ci = f" [{v['ci95'][0]:+.3f}, {v['ci95'][1]:+.3f}]" if v["ci95"] else ""
            cells.append(f"{v['a']:.3f} | {v['b']:.3f} | {v['difference']:+.3f}{ci}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", f"Verdict: B {result['verdict']}."]
    return "\n".join(lines) + "\n"


def write_ensemble(folders: Sequence[str | Path], output: str | Path) -> dict[str, Any]:
    """Write ``output`` as the yardstick folder of the ensemble of every run of ``folders``:
    each set all runs predicted, with the mean of their calibrated (and raw) probabilities."""
    output = Path(output)
    runs = [run for folder in folders for run in yardstick_runs(folder)]
    if output.resolve() in {r.resolve() for r in runs}:
        raise DataError(f"{output}: the ensemble's folder is one of its members")
    per_run = [yardstick_sets(run) for run in runs]
    common = [s for s in per_run[0] if all(s in sets for sets in per_run)]
    if not common:
        raise DataError("the members share no yardstick set", [str(r) for r in runs])
    sites = []
    for name in common:
        reference = per_run[0][name]
        classes = list(reference.classes)
        columns = classes
        if all(sets[name].has_raw for sets in per_run):
            columns = [*classes, *(f"{RAW_PREFIX}{c}" for c in classes)]
        aligned = [_aligned(name, reference, sets[name], columns) for sets in per_run]
        mean = np.mean([a[columns].to_numpy(np.float64) for a in aligned], axis=0)
        first = reference.table.columns.get_loc(classes[0])
        keys = reference.table[list(reference.table.columns[:first])]
        raw = mean[:, len(classes) :] if len(columns) > len(classes) else None
        table = labelled_predictions(keys, mean[:, : len(classes)], classes, raw=raw)
        if name == ISIC_SET:
            (output / ISIC_SET).mkdir(parents=True, exist_ok=True)
            write_predictions(table, output / ISIC_SET / EVALUATION_PREDICTIONS)
        else:
            sites.append(table)
    if sites:
        cross = RunFolder(output / CROSS_SITE_DIR)
        cross.root.mkdir(parents=True, exist_ok=True)
        write_predictions(pd.concat(sites, ignore_index=True), cross.oof_predictions)
    members = {"members": [str(r) for r in runs], "sets": common}
    (output / MEMBERS_FILE).write_text(json.dumps(members, indent=2))
    return members


def write_yardstick(result: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(result, indent=2, allow_nan=False))
