"""Strict typed config: defaults < YAML file < ``key=value`` overrides; bad keys are named."""

from __future__ import annotations

from pathlib import Path

import pytest

from skinlesion.core.config import (
    Config,
    ConfigError,
    config_to_dict,
    load_config,
    parse_overrides,
    save_config,
)
from skinlesion.core.run_folder import recipe_of, resume_changes

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_defaults_load() -> None:
    cfg = load_config()
    assert cfg == Config()
    assert cfg.train.epochs == 20
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.cv.n_folds == 5
    assert cfg.cv.folds_to_run is None
    assert cfg.seed == 42
    assert cfg.augment.scale == (0.9, 1.1)


def test_file_then_overrides_take_precedence(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "train:\n  epochs: 7\n  batch_size: 16\n"
        "cv:\n  folds_to_run: [3]\n"
        "data:\n  image_size: 64\n",
    )
    from_file = load_config(path)
    assert from_file.train.epochs == 7
    assert from_file.train.batch_size == 16
    assert from_file.cv.folds_to_run == [3]
    assert from_file.train.lr == pytest.approx(3e-4)  # untouched default

    cfg = load_config(path, ["train.epochs=2", "cv.folds_to_run=[0,1]", "train.lr=1e-3"])
    assert cfg.train.epochs == 2
    assert cfg.cv.folds_to_run == [0, 1]
    assert isinstance(cfg.train.lr, float)
    assert cfg.train.lr == pytest.approx(1e-3)
    # Keys set only in the file survive an override of a sibling key.
    assert cfg.train.batch_size == 16
    assert cfg.data.image_size == 64


def test_later_override_wins() -> None:
    cfg = load_config(None, ["train.epochs=2", "train.epochs=9"])
    assert cfg.train.epochs == 9


def test_parse_overrides_nests_and_types_values() -> None:
    tree = parse_overrides(["train.epochs=3", "model.pretrained=false", "train.patience="])
    assert tree == {"train": {"epochs": 3, "patience": None}, "model": {"pretrained": False}}


def test_empty_override_value_is_null() -> None:
    assert load_config(None, ["train.patience="]).train.patience is None


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("bogus=1", "bogus"),
        ("train.lrr=1e-3", "train.lrr"),
        ("augment.flipp=0.5", "augment.flipp"),
        ("tracking.tensorbord=false", "tracking.tensorbord"),
    ],
)
def test_unknown_key_is_named(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"{key}: unknown key"):
        load_config(None, [override])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.imagesize=64", "data.imagesize: unknown key; did you mean image_size"),
        ("outputdir=runs/x", "outputdir: unknown key; did you mean output_dir?"),
        ("data.columns.lable=y", "data.columns.lable: unknown key; did you mean label?"),
        ("trian.epochs=2", "trian: unknown key; did you mean train"),
    ],
)
def test_unknown_key_gets_its_close_match(override: str, message: str) -> None:
    """As an unknown value does: the close matches (best first), then the section's keys."""
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert message in str(info.value)
    assert "(known: " in str(info.value)


def test_unknown_key_in_file_is_named(tmp_path: Path) -> None:
    path = _write(tmp_path, "train:\n  epochs: 3\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"train\.lrr: unknown key") as info:
        load_config(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.epochs=abc", "train.epochs"),
        ("model.pretrained=maybe", "model.pretrained"),
        ("train.epochs=2.5", "train.epochs"),
        ("train.epochs=true", "train.epochs"),
        ("cv.folds_to_run=[0,x]", "cv.folds_to_run"),
        ("train.optimizer=adam", "train.optimizer"),
        ("train.lr=-1", "train.lr"),
        ("tracking.tensorboard=maybe", "tracking.tensorboard"),
        ("tracking.mlflow_uri=' '", "tracking.mlflow_uri"),
        ("tracking.mlflow_uri=5", "tracking.mlflow_uri"),
        ("tracking.mlflow_experiment=", "tracking.mlflow_experiment"),
    ],
)
def test_wrong_type_or_value_is_named(override: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert key in str(info.value)


def test_tracking_defaults_and_keys_a_resume_may_change() -> None:
    cfg = load_config(None, ["tracking.mlflow_uri=sqlite:///m.db"])
    assert Config().tracking.tensorboard and Config().tracking.mlflow_uri is None
    assert cfg.tracking.mlflow_uri == "sqlite:///m.db" and cfg.tracking.mlflow_experiment
    # Tracking records a run; it does not decide what is trained.
    off = load_config(None, ["tracking.tensorboard=false"])
    assert recipe_of(config_to_dict(cfg)) == recipe_of(config_to_dict(off))
    assert resume_changes(cfg, off) == []
    assert resume_changes(cfg, load_config(None, ["train.lr=1"])) != []


def test_several_bad_keys_reported_together() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, ["train.epochs=abc", "model.pretrained=maybe", "train.lrr=1"])
    msg = str(info.value)
    assert "train.epochs" in msg
    assert "model.pretrained" in msg
    assert "train.lrr" in msg


def test_int_accepted_where_float_declared(tmp_path: Path) -> None:
    cfg = load_config(None, ["train.lr=1", "train.grad_clip=2", "loss.alpha=[1,2,3,4,5,6,7]"])
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.train.grad_clip == 2.0 and isinstance(cfg.train.grad_clip, float)
    assert cfg.loss.alpha == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
    assert all(isinstance(a, float) for a in cfg.loss.alpha)
    scaled = load_config(_write(tmp_path, "augment:\n  scale: [1, 2]\n"))
    assert scaled.augment.scale == (1.0, 2.0)


def test_yaml_exponent_without_dot_becomes_float(tmp_path: Path) -> None:
    # YAML 1.1 (PyYAML) reads ``3e-4`` as the string '3e-4'.
    cfg = load_config(_write(tmp_path, "train:\n  lr: 3e-4\n  weight_decay: 1e-5\n"))
    assert isinstance(cfg.train.lr, float)
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.train.weight_decay == pytest.approx(1e-5)


def test_float_text_is_not_accepted_for_int() -> None:
    with pytest.raises(ConfigError, match=r"data\.image_size"):
        load_config(None, ["data.image_size=1e3"])


def test_string_in_string_field_stays_string() -> None:
    assert load_config(None, ["model.backbone=1e3"]).model.backbone == "1e3"


@pytest.mark.parametrize("bad", ["foo", "=3"])
def test_malformed_override(bad: str) -> None:
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, [bad])


def test_override_through_a_scalar_is_an_error() -> None:
    with pytest.raises(ConfigError, match="train.epochs"):
        load_config(None, ["train.epochs=3", "train.epochs.x=1"])


def test_missing_config_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="not found") as info:
        load_config(missing)
    assert str(missing) in str(info.value)


def test_non_mapping_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="mapping"):
        load_config(_write(tmp_path, "- a\n- b\n"))


def test_invalid_yaml_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "train: [1, 2\n"))


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    assert load_config(_write(tmp_path, "")) == Config()


def test_round_trip_through_yaml(tmp_path: Path) -> None:
    cfg = load_config(
        None,
        [
            "train.epochs=2",
            "train.lr=1e-10",
            "cv.folds_to_run=[0,1]",
            "augment.scale=[0.8,1.25]",
            "loss.alpha=[1,2,3,4,5,6,7]",
            "model.pretrained=false",
            "data.root=/some/where",
            "train.patience=",
        ],
    )
    plain = config_to_dict(cfg)
    assert isinstance(plain["augment"]["scale"], list)  # tuples become lists
    path = tmp_path / "resolved.yaml"
    save_config(cfg, path)
    again = load_config(path)
    assert again == cfg
    assert config_to_dict(again) == plain


def test_assignment_is_validated() -> None:
    cfg = load_config()
    with pytest.raises(ValueError):
        cfg.train.epochs = "many"  # type: ignore[assignment]
    # Defaults are not shared between configs.
    other = load_config()
    cfg.train.epochs = 3
    assert other.train.epochs == 20


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg.train.lr, float)
    assert cfg.data.image_size >= 16


def test_there_are_shipped_configs() -> None:
    assert len(CONFIGS) >= 1


def test_old_metadata_key_is_the_labels_file(tmp_path: Path) -> None:
    """``data.metadata`` (HAM10000's label table, before "metadata" meant patient fields only)
    still loads, as ``data.labels``, with a warning; a saved ``metadata: null`` loads silently."""
    path = tmp_path / "old.yaml"
    path.write_text("data:\n  root: ham\n  metadata: ham/HAM10000_metadata.csv\n")
    with pytest.warns(DeprecationWarning, match="data.metadata is deprecated"):
        cfg = load_config(str(path), [])
    assert cfg.data.labels == "ham/HAM10000_metadata.csv"
    assert "metadata" not in config_to_dict(cfg)["data"]
    path.write_text("data:\n  root: ham\n  metadata: null\n  labels: null\n")
    assert load_config(str(path), []).data.labels is None
    with pytest.raises(ConfigError, match="name different files"):
        load_config(None, ["data.metadata=a.csv", "data.labels=b.csv"])


def test_saved_config_with_old_metadata_key_compares_as_the_same_recipe() -> None:
    old = {"data": {"root": "r", "labels": None, "metadata": "m.csv"}, "seed": 1}
    new = {"data": {"root": "r", "labels": "m.csv"}, "seed": 1}
    assert recipe_of(old) == recipe_of(new)
    assert recipe_of({"data": {"metadata": None, "labels": None}}) == {"data": {"labels": None}}
