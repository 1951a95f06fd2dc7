"""The cross-site score and its paired comparison on hand-made predictions: a model that is
better on every set wins, one that loses a set does not, the mean is the sets' mean, and the
training runs of a recipe (``seed_N/``) are averaged and resampled."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from skinlesion.core.labels import CLASSES
from skinlesion.core.run_folder import RunFolder
from skinlesion.evaluation.prediction_files import read_predictions
from skinlesion.evaluation.yardstick import (
    compare_yardsticks,
    render_yardstick_comparison,
    verdict,
    write_ensemble,
    yardstick_score,
)


def _probs(y: np.ndarray, skill: float, rng: np.random.Generator) -> np.ndarray:
    """Probabilities whose true class gets ``skill`` more logit on average."""
    logits = rng.normal(0, 1, (len(y), len(CLASSES)))
    logits[np.arange(len(y)), y] += skill
    e = np.exp(logits)
    return e / e.sum(1, keepdims=True)


def _write(folder: Path, skills: dict[str, float], seed: int = 0) -> Path:
    """A yardstick folder: a cross-site run's out-of-fold table for two sites and an evaluation."""
    rng = np.random.default_rng(seed)
    parts = []
    for k, (site, skill) in enumerate(skills.items()):
        y = np.arange(280) % len(CLASSES)
        table = pd.DataFrame(
            {
                "image_id": [f"{site}_{i}" for i in range(len(y))],
                "lesion_id": [f"{site}_L{i // 2}" for i in range(len(y))],
                "dx": [CLASSES[c] for c in y],
                "site": site,
                "fold": k,
            }
        )
        probs = _probs(y, skill, np.random.default_rng(100 + k))
        noise = rng.normal(0, 0.01, probs.shape)  # a model-specific wobble
        probs = np.clip(probs + np.abs(noise), 1e-6, None)
        probs /= probs.sum(1, keepdims=True)
        for i, c in enumerate(CLASSES):
            table[c] = probs[:, i]
        table["prediction"] = [CLASSES[i] for i in probs.argmax(1)]
        for i, c in enumerate(CLASSES):
            table[f"raw_{c}"] = probs[:, i]
        parts.append(table)
    run = RunFolder(folder / "cross_site")
    run.root.mkdir(parents=True)
    pd.concat(parts).to_csv(run.oof_predictions, index=False)
    return folder


def _recipe(folder: Path, runs: list[dict[str, float]], seed: int = 0) -> Path:
    """A yardstick folder with one run per entry of ``runs``: the first in the folder, the
    others in ``seed_1/``, ``seed_2/``..."""
    for k, skills in enumerate(runs):
        _write(folder if k == 0 else folder / f"seed_{k}", skills, seed=seed + 10 * k)
    return folder


def test_score_is_the_mean_of_the_sets(tmp_path: Path) -> None:
    score = yardstick_score(_write(tmp_path / "a", {"north": 1.0, "south": 2.0}))
    for figure in ("mel_auroc", "balanced_accuracy"):
        values = [s[figure] for s in score["sets"].values()]
        assert score["mean"][figure] == pytest.approx(np.mean(values))
    assert score["sets"]["south"]["mel_auroc"] > score["sets"]["north"]["mel_auroc"]


def test_better_on_every_set_wins_and_a_lost_set_does_not(tmp_path: Path) -> None:
    a = _recipe(tmp_path / "a", [{"north": 0.5, "south": 0.5}] * 2)
    better = _recipe(tmp_path / "b", [{"north": 2.5, "south": 2.5}] * 2, seed=1)
    result = compare_yardsticks(a, better, n_boot=200)
    assert result["runs"] == {"a": 2, "b": 2}
    assert result["verdict"] == "wins"
    assert result["mean"]["mel_auroc"]["ci95"][0] > 0
    mixed = _recipe(tmp_path / "c", [{"north": 3.0, "south": -0.5}] * 2, seed=2)
    lost = compare_yardsticks(a, mixed, n_boot=200)
    assert lost["verdict"].startswith("does not win: loses on south")
    table = render_yardstick_comparison(lost)
    assert "| mean |" in table and "| south |" in table and "lesions and runs" in table


def test_one_training_run_per_recipe_cannot_win(tmp_path: Path) -> None:
    a = _write(tmp_path / "a", {"north": 0.5, "south": 0.5})
    better = _recipe(tmp_path / "b", [{"north": 2.5, "south": 2.5}] * 2, seed=1)
    result = compare_yardsticks(a, better, n_boot=200)
    assert result["mean"]["mel_auroc"]["ci95"][0] > 0
    assert result["verdict"].startswith("cannot win yet: one training run of A")


def test_runs_are_averaged_and_their_spread_widens_the_interval(tmp_path: Path) -> None:
    a = _recipe(tmp_path / "a", [{"north": 1.0, "south": 1.0}] * 2)
    steady = _recipe(tmp_path / "steady", [{"north": 1.5, "south": 1.5}] * 2, seed=1)
    spread = _recipe(
        tmp_path / "spread", [{"north": 0.5, "south": 0.5}, {"north": 2.5, "south": 2.5}]
    )
    score = yardstick_score(spread)
    assert len(score["runs"]) == 2
    north = score["sets"]["north"]
    assert north["mel_auroc"] == pytest.approx(np.mean(north["runs"]["mel_auroc"]))
    assert north["runs"]["mel_auroc"][1] > north["runs"]["mel_auroc"][0]

    def width(folder: Path) -> float:
        low, high = compare_yardsticks(a, folder, n_boot=300)["mean"]["mel_auroc"]["ci95"]
        return high - low

    assert width(spread) > 2 * width(steady)


def test_a_set_missing_from_one_run_is_left_out(tmp_path: Path) -> None:
    a = _recipe(tmp_path / "a", [{"north": 1.0, "south": 1.0}, {"north": 1.0}])
    b = _recipe(tmp_path / "b", [{"north": 2.0, "south": 2.0}] * 2, seed=1)
    result = compare_yardsticks(a, b, n_boot=50)
    assert result["sets"] == ["north"] and result["left_out"] == ["south"]
    assert "not in every run: south" in render_yardstick_comparison(result)


def test_sets_predicted_for_other_images_are_refused(tmp_path: Path) -> None:
    a = _write(tmp_path / "a", {"north": 1.0})
    other = tmp_path / "b"
    _write(other, {"north": 1.0})
    oof = RunFolder(other / "cross_site").oof_predictions
    table = pd.read_csv(oof)
    table.loc[0, "image_id"] = "elsewhere"
    table.to_csv(oof, index=False)
    with pytest.raises(Exception, match="did not predict the same labelled images"):
        compare_yardsticks(a, other, n_boot=10)


def test_an_ensemble_folder_averages_every_run_on_the_shared_sets(tmp_path: Path) -> None:
    a = _recipe(tmp_path / "a", [{"north": 1.0, "south": 1.0}, {"north": 1.0, "south": 1.0}])
    b = _write(tmp_path / "b", {"north": 2.0})
    oof = RunFolder(b / "cross_site").oof_predictions
    pd.read_csv(oof).sample(frac=1.0, random_state=0).to_csv(oof, index=False)  # rows by image
    made = write_ensemble([a, b], tmp_path / "ens")
    assert made["sets"] == ["north"] and len(made["members"]) == 3
    got = read_predictions(RunFolder(tmp_path / "ens" / "cross_site").oof_predictions)
    members = [a, a / "seed_1", b]
    tables = [pd.read_csv(RunFolder(m / "cross_site").oof_predictions) for m in members]
    tables = [t[t["site"] == "north"].set_index("image_id")[list(CLASSES)] for t in tables]
    want = (tables[0] + tables[1] + tables[2]) / 3
    table = got.table.set_index("image_id")
    np.testing.assert_allclose(table[list(CLASSES)], want.loc[table.index], atol=1e-7)
    assert list(table["prediction"]) == list(want.loc[table.index].idxmax(axis=1))
    lesions = [f"north_L{int(i.split('_')[1]) // 2}" for i in table.index]
    assert got.has_raw and list(table["lesion_id"]) == lesions
    with pytest.raises(Exception, match="one of its members"):
        write_ensemble([a], a)


def test_verdict_rules() -> None:
    def f(d: float, lo: float, hi: float) -> dict[str, object]:
        return {"a": 0.5, "b": 0.5 + d, "difference": d, "ci95": [lo, hi]}

    ok = {"x": {"mel_auroc": f(0.05, 0.01, 0.09), "balanced_accuracy": f(0, -0.02, 0.02)}}
    assert verdict(ok, ok["x"]) == "wins"
    flat = {"x": {"mel_auroc": f(0.02, -0.01, 0.05), "balanced_accuracy": f(0, -0.02, 0.02)}}
    assert "reaches 0" in verdict(flat, flat["x"])
    bal = {"x": {"mel_auroc": f(0.05, 0.01, 0.09), "balanced_accuracy": f(-0.05, -0.08, -0.01)}}
    assert "loses on x balanced_accuracy" in verdict(bal, bal["x"])
