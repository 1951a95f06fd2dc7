"""Every key of the Config, enumerated from the schema, so that a key added later cannot slip
past two rules: ``--resume`` refuses a change of every key but the documented per-run ones, and
a default that no shipped config sets is still exercised by some test."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from skinlesion.core.config import Config, config_to_dict, load_config, save_config
from skinlesion.core.errors import ConfigError
from skinlesion.core.run_folder import PER_RUN_KEYS, check_resume_config, config_leaves

REPO = Path(__file__).resolve().parents[2]
LEAVES = list(config_leaves(config_to_dict(Config())))

# The keys a resumed run may change (core/run_folder.py says why each is harmless: where a part
# wrote, which folds it ran, machine settings, tracking). Widening it is a decision, made here too.
ALLOWED_ON_RESUME = {
    "cv.folds_to_run",
    "output_dir",
    "train.device",
    "train.num_threads",
    "data.cache_dir",
    "tracking.tensorboard",
    "tracking.mlflow_uri",
    "tracking.mlflow_experiment",
}

_CSV = ["data.format=csv", "data.images=imgs", "data.labels=labels.csv"]
_TWO_SOURCES = (
    "data.sources=[{name: a, format: ham10000, root: ra}, {name: b, format: ham10000, root: rb}]"
)
# key: (the saved run's overrides, the one override a resume adds): a valid config either way,
# differing from the saved one in that key.
CHANGES: dict[str, tuple[list[str], str]] = {
    "data.format": ([], "data.format=isic2019"),
    "data.root": ([], "data.root=elsewhere"),
    "data.images": (_CSV, "data.images=other_imgs"),
    "data.labels": (_CSV, "data.labels=other.csv"),
    "data.columns.image": (_CSV, "data.columns.image=file"),
    "data.columns.label": (_CSV, "data.columns.label=diagnosis"),
    "data.columns.group": (_CSV, "data.columns.group=patient"),
    "data.columns.age": (_CSV, "data.columns.age=age_approx"),
    "data.columns.sex": (_CSV, "data.columns.sex=gender"),
    "data.columns.localization": (_CSV, "data.columns.localization=site"),
    "data.classes": (_CSV, "data.classes=[mel,nv]"),
    "data.where": (["data.format=isic2019"], "data.where={split: [train]}"),
    "data.image_size": ([], "data.image_size=224"),
    "data.max_images": ([], "data.max_images=100"),
    "data.cache_dir": ([], "data.cache_dir=/elsewhere/cache"),
    "data.colour_constancy": ([], "data.colour_constancy=true"),
    "data.interpolation": ([], "data.interpolation=bilinear"),
    "data.match_detail": ([], "data.match_detail=false"),
    "data.sources": ([_TWO_SOURCES], _TWO_SOURCES.replace("root: rb", "root: rc")),
    "cv.n_folds": ([], "cv.n_folds=3"),
    "cv.folds_to_run": ([], "cv.folds_to_run=[0]"),
    "cv.seed": ([], "cv.seed=7"),
    "cv.grouped": ([], "cv.grouped=false"),
    "cv.folds_file": ([], "cv.folds_file=folds.csv"),
    "cv.holdout_column": ([], "cv.holdout_column=dataset"),
    "cv.holdout": (["cv.holdout_column=dataset"], "cv.holdout=[rosendahl]"),
    "model.backbone": ([], "model.backbone=resnet18"),
    "model.pretrained": ([], "model.pretrained=false"),
    "model.weights": ([], "model.weights=w.pth"),
    "model.drop_rate": ([], "model.drop_rate=0.1"),
    "model.drop_path_rate": ([], "model.drop_path_rate=0.1"),
    "model.metadata": ([], "model.metadata=[age]"),
    "model.metadata_hidden": ([], "model.metadata_hidden=64"),
    "model.metadata_drop": ([], "model.metadata_drop=0.5"),
    "model.metadata_sites": ([], "model.metadata_sites=as_is"),
    "train.scheme": ([], "train.scheme=linear_probe"),
    "train.freeze_stages": ([], "train.freeze_stages=2"),
    "train.mixstyle": ([], "train.mixstyle=0.5"),
    "train.mixstyle_alpha": ([], "train.mixstyle_alpha=0.3"),
    "train.mixstyle_stages": ([], "train.mixstyle_stages=[1,2]"),
    "train.average_from": ([], "train.average_from=1"),
    "train.average_only": (["train.average_from=1"], "train.average_only=true"),
    "train.probe_flips": ([], "train.probe_flips=false"),
    "train.epochs": ([], "train.epochs=3"),
    "train.batch_size": ([], "train.batch_size=16"),
    "train.sync_bn": ([], "train.sync_bn=false"),
    "train.eval_batch_size": ([], "train.eval_batch_size=64"),
    "train.lr": ([], "train.lr=0.001"),
    "train.weight_decay": ([], "train.weight_decay=0.05"),
    "train.optimizer": ([], "train.optimizer=sgd"),
    "train.scheduler": ([], "train.scheduler=plateau"),
    "train.warmup_epochs": ([], "train.warmup_epochs=0"),
    "train.patience": ([], "train.patience=3"),
    "train.steps_per_epoch": ([], "train.steps_per_epoch=10"),
    "train.grad_clip": ([], "train.grad_clip=1.0"),
    "train.device": ([], "train.device=cpu"),
    "train.amp": ([], "train.amp=false"),
    "train.channels_last": ([], "train.channels_last=false"),
    "train.compile": ([], "train.compile=true"),
    "train.deterministic": ([], "train.deterministic=true"),
    "train.num_threads": ([], "train.num_threads=2"),
    "loss.name": ([], "loss.name=ce"),
    "loss.gamma": ([], "loss.gamma=1.0"),
    "loss.alpha": ([], "loss.alpha=[1,1,1,1,1,1,2]"),
    "loss.label_smoothing": ([], "loss.label_smoothing=0.1"),
    "sampler.name": ([], "sampler.name=random"),
    "sampler.power": ([], "sampler.power=0.5"),
    "augment.hflip": ([], "augment.hflip=0"),
    "augment.vflip": ([], "augment.vflip=0"),
    "augment.rotation": ([], "augment.rotation=90"),
    "augment.scale": ([], "augment.scale=[0.8,1.2]"),
    "augment.brightness": ([], "augment.brightness=0.1"),
    "augment.contrast": ([], "augment.contrast=0.1"),
    "augment.saturation": ([], "augment.saturation=0.1"),
    "augment.hue": ([], "augment.hue=0.05"),
    "augment.p_colour": ([], "augment.p_colour=0.5"),
    "augment.aspect": ([], "augment.aspect=[0.9,1.1]"),
    "augment.vignette": ([], "augment.vignette=0.5"),
    "augment.blur": ([], "augment.blur=0.5"),
    "augment.blur_sigma": ([], "augment.blur_sigma=[0.5,1.0]"),
    "augment.gamma": ([], "augment.gamma=[0.8,1.2]"),
    "augment.channel_gain": ([], "augment.channel_gain=0.1"),
    "augment.downscale": ([], "augment.downscale=0.5"),
    "augment.downscale_range": ([], "augment.downscale_range=[0.5,1.0]"),
    "augment.jpeg": ([], "augment.jpeg=0.5"),
    "augment.jpeg_quality": ([], "augment.jpeg_quality=[50,90]"),
    "eval.tta": ([], "eval.tta=2"),
    "eval.calibrate": ([], "eval.calibrate=false"),
    "eval.n_boot": ([], "eval.n_boot=10"),
    "eval.familiarity": ([], "eval.familiarity=false"),
    "tracking.tensorboard": ([], "tracking.tensorboard=false"),
    "tracking.mlflow_uri": ([], "tracking.mlflow_uri=sqlite:///m.db"),
    "tracking.mlflow_experiment": ([], "tracking.mlflow_experiment=other"),
    "output_dir": ([], "output_dir=runs/other"),
    "seed": ([], "seed=7"),
}


def test_every_config_key_has_a_change_to_try() -> None:
    """A key added to the Config needs an entry in CHANGES, so the resume rule covers it."""
    assert sorted(set(LEAVES) - set(CHANGES)) == [], "add these keys to CHANGES"
    assert sorted(set(CHANGES) - set(LEAVES)) == [], "these keys left the Config"


def test_the_per_run_keys_are_the_documented_ones() -> None:
    assert {".".join(k) for k in PER_RUN_KEYS} == ALLOWED_ON_RESUME


@pytest.mark.parametrize("key", LEAVES)
def test_resume_refuses_every_key_but_the_per_run_ones(key: str, tmp_path: Path) -> None:
    """The saved run's config against the same one with ``key`` changed, through the check
    that ``train --resume`` and ``fit-final --resume`` make before any work."""
    base, change = CHANGES[key]
    saved, new = load_config(None, base), load_config(None, [*base, change])
    assert config_leaves(config_to_dict(saved))[key] != config_leaves(config_to_dict(new))[key]
    path = tmp_path / "config.yaml"
    save_config(saved, path)
    if key in ALLOWED_ON_RESUME:
        assert check_resume_config(path, new) == saved
        return
    with pytest.raises(ConfigError, match="--resume would change") as info:
        check_resume_config(path, new)
    assert f"{key}: " in str(info.value)


# -- defaults that no shipped config sets ------------------------------------------------------

# Keys whose effect a test exercises without spelling the dotted name (a section object built
# with the field, a default column read): the test, whose source names the field.
EXERCISED_BY: dict[str, str] = {
    "data.columns.image": "tests/data/test_datasets.py::"
    "test_csv_set_takes_lesion_id_when_present_and_files_named_by_path",
    "data.columns.label": "tests/data/test_datasets.py::"
    "test_csv_set_takes_lesion_id_when_present_and_files_named_by_path",
    "data.columns.age": "tests/data/test_datasets.py::"
    "test_csv_set_takes_lesion_id_when_present_and_files_named_by_path",
    "data.columns.sex": "tests/data/test_datasets.py::"
    "test_csv_set_metadata_becomes_canonical_and_unknown_is_nan",
    "data.columns.localization": "tests/data/test_datasets.py::"
    "test_csv_set_metadata_becomes_canonical_and_unknown_is_nan",
    "augment.p_colour": "tests/data/test_augment.py::test_p_colour_zero_leaves_colour_untouched",
    "augment.blur": "tests/data/test_augment.py::test_blur_probability_blurs_some_samples_only",
    "augment.blur_sigma": "tests/data/test_augment.py::"
    "test_blur_probability_blurs_some_samples_only",
    "augment.gamma": "tests/data/test_augment.py::test_gamma_is_a_power_curve",
    "augment.channel_gain": "tests/data/test_augment.py::"
    "test_channel_gain_is_a_cast_not_a_brightness_change",
    "augment.downscale": "tests/data/test_augment.py::"
    "test_downscale_is_a_shrunk_and_enlarged_copy_at_its_rate",
    "augment.downscale_range": "tests/data/test_augment.py::"
    "test_downscale_is_a_shrunk_and_enlarged_copy_at_its_rate",
    "augment.jpeg": "tests/data/test_augment.py::"
    "test_jpeg_is_a_round_trip_at_a_quality_of_its_range",
    "augment.jpeg_quality": "tests/data/test_augment.py::"
    "test_jpeg_is_a_round_trip_at_a_quality_of_its_range",
}


def _shipped_keys() -> set[str]:
    """The keys some ``configs/*.yaml`` sets (a mapping-valued key such as ``data.where`` and a
    list such as ``data.sources`` count as one)."""

    def flat(tree: dict, prefix: str = "") -> set[str]:
        out: set[str] = set()
        for name, value in tree.items():
            key = f"{prefix}{name}"
            nested = isinstance(value, dict) and key not in LEAVES
            out |= flat(value, f"{key}.") if nested else {key}
        return out

    found: set[str] = set()
    for path in sorted((REPO / "configs").glob("*.yaml")):
        found |= flat(yaml.safe_load(path.read_text()) or {})
    return found


def names_key(text: str, key: str) -> bool:
    """Whether test source ``text`` names the config ``key``: the dotted name as a whole (an
    override, a dict key, ``cfg.train.lr``); a top-level key as an override (``"seed=``)."""
    if "." in key:
        return re.search(rf"(?<!\w){re.escape(key)}(?![\w.])", text) is not None
    return re.search(rf"[\"']{re.escape(key)}=", text) is not None


def test_names_key() -> None:
    assert names_key('["train.lr=1"]', "train.lr")
    assert names_key("cfg.cv.grouped and x", "cv.grouped")
    assert not names_key('"cv.holdout_column=site"', "cv.holdout")
    assert not names_key('"augment.blur_sigma=[1,2]"', "augment.blur")
    assert names_key('["seed=3"]', "seed") and not names_key("make(seed=3)", "seed")


def _test_sources() -> dict[Path, str]:
    here = Path(__file__).resolve()
    return {p: p.read_text() for p in sorted((REPO / "tests").rglob("*.py")) if p != here}


def test_every_default_no_shipped_config_sets_is_exercised_by_a_test() -> None:
    """A new key whose default no recipe sets fails here until a test exercises it."""
    shipped = _shipped_keys()
    assert shipped and shipped <= set(LEAVES), sorted(shipped - set(LEAVES))
    sources = _test_sources()
    untested = [
        key
        for key in LEAVES
        if key not in shipped
        and key not in EXERCISED_BY
        and not any(names_key(text, key) for text in sources.values())
    ]
    assert untested == [], f"no test exercises the defaults of {untested}: write one (or map it)"


@pytest.mark.parametrize("key", sorted(EXERCISED_BY))
def test_each_mapped_test_exists_and_names_the_field(key: str) -> None:
    path, name = EXERCISED_BY[key].split("::")
    tree = ast.parse((REPO / path).read_text())
    found = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name]
    assert found, f"{EXERCISED_BY[key]}: no such test"
    assert key.rpartition(".")[2] in ast.get_source_segment((REPO / path).read_text(), found[0])
    # A key a config sets later (a candidate recipe) may keep its entry: the test still runs it.
    assert key in LEAVES
