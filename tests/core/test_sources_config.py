"""``data.sources``: a strict list of labelled sets; every fault names the key and the source."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from skinlesion.core.config import ConfigError, config_to_dict, load_config, save_config
from skinlesion.core.labels import CLASSES
from skinlesion.core.sources import SINGLE_SOURCE_KEYS, SourceConfig

CONFIGS = Path(__file__).parents[2] / "configs"
HAM = "{name: ham, format: ham10000, root: h}"
ISIC = "{name: isic2017, format: csv, images: i, labels: l.csv, where: {split: [train, val]}}"


def _sources(*entries: str) -> str:
    return f"data.sources=[{', '.join(entries)}]"


def _error(*overrides: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(None, list(overrides))
    return str(info.value)


def test_sources_load_with_shared_keys_at_the_top() -> None:
    cfg = load_config(None, ["data.image_size=64", _sources(HAM, ISIC)])
    assert cfg.data.sources is not None
    assert [s.name for s in cfg.data.sources] == ["ham", "isic2017"]
    assert cfg.data.sources[1].where == {"split": ["train", "val"]}
    assert cfg.data.sources[1].classes is None  # the labels it contains
    assert cfg.data.image_size == 64


def test_unknown_key_names_the_source() -> None:
    bad = "{name: isic2017, format: csv, images: i, labels: l.csv, wher: {split: train}}"
    msg = _error(_sources(HAM, bad))
    assert "data.sources[1] (isic2017): wher: unknown key" in msg


def test_duplicate_name_names_both_sources() -> None:
    msg = _error(_sources(HAM, "{name: ham, format: csv, images: i, labels: l.csv}"))
    assert "data.sources[1] (ham): name 'ham' is already the name of data.sources[0]" in msg


@pytest.mark.parametrize(
    "override",
    [
        "data.root=x",
        "data.format=csv",
        "data.images=x",
        "data.labels=x.csv",
        "data.classes=[mel, nv]",
        "data.max_images=100",
        "data.columns.group=lesion",
        "data.where={split: train}",
    ],
)
def test_single_source_key_beside_sources_is_named(override: str) -> None:
    key = override.split("=")[0].split(".")[1]
    msg = _error(_sources(HAM), override)
    assert f"data.{key}: describes one labelled set" in msg


def test_old_metadata_key_beside_sources_is_named_by_its_new_name() -> None:
    with pytest.warns(DeprecationWarning, match="data.metadata is deprecated"):
        msg = _error(_sources(HAM), "data.metadata=m.csv")
    assert "data.labels: describes one labelled set" in msg


def test_format_keys_of_a_source_name_it() -> None:
    assert "data.sources[1] (isic2017): format=csv needs labels" in _error(
        _sources(HAM, "{name: isic2017, format: csv, images: i}")
    )
    assert "data.sources[0] (ham): format=ham10000 needs root" in _error(
        _sources("{name: ham, format: ham10000}")
    )
    assert "data.sources[0] (ham): images: not a key of format=ham10000" in _error(
        _sources("{name: ham, format: ham10000, root: h, images: i}")
    )
    assert "data.sources[0] (ham): where applies to format=csv or isic2019" in _error(
        _sources("{name: ham, format: ham10000, root: h, where: {split: train}}")
    )


@pytest.mark.parametrize(
    ("entry", "fragment"),
    [
        ("{name: 'a:b', format: ham10000, root: h}", "data.sources[0] (a:b): name"),
        ("{format: ham10000, root: h}", "data.sources[0]: name: Field required"),
        ("{name: a, format: ham1000, root: h}", "data.sources[0] (a): format: unknown value"),
        ("{name: a, format: ham10000, root: h, classes: [mel, mel]}", "(a): classes"),
        ("{name: a, format: ham10000, root: h, max_images: 3}", "(a): max_images"),
    ],
)
def test_bad_values_name_the_source(entry: str, fragment: str) -> None:
    assert fragment in _error(_sources(entry))


def test_empty_sources_is_an_error() -> None:
    assert "data.sources is empty" in _error("data.sources=[]")


def test_single_source_config_is_unchanged() -> None:
    """No ``sources`` key in the saved config of a run without sources: run folders and
    checkpoints written before the key existed compare equal to new ones."""
    data = config_to_dict(load_config(None, ["data.root=x"]))["data"]
    assert "sources" not in data
    assert data["root"] == "x" and data["format"] == "ham10000"


def test_sources_round_trip_through_the_run_folder(tmp_path: Path) -> None:
    cfg = load_config(None, [_sources(HAM, ISIC)])
    saved = tmp_path / "config.yaml"
    save_config(cfg, saved)
    data = yaml.safe_load(saved.read_text())["data"]
    assert not set(SINGLE_SOURCE_KEYS) & set(data)  # only the shared keys beside sources
    assert load_config(saved) == cfg


def test_recipes_differ_only_in_the_isic2017_label_space() -> None:
    masked = load_config(CONFIGS / "ham10000_isic2017_cpu.yaml")
    nomask = load_config(CONFIGS / "ham10000_isic2017_cpu_nomask.yaml")
    assert masked.data.sources is not None and nomask.data.sources is not None
    ham, isic = masked.data.sources
    assert (ham.name, ham.format, isic.name, isic.format) == (
        "ham10000",
        "ham10000",
        "isic2017",
        "csv",
    )
    assert isic.where == {"split": ["train", "val"]} and isic.classes is None
    assert nomask.data.sources[1].classes == list(CLASSES)
    assert masked.cv.folds_to_run == [0] and masked.model.backbone == "tf_efficientnet_lite0"
    assert (masked.data.image_size, masked.train.epochs) == (160, 4)
    changed = masked.model_copy(deep=True)
    changed.data.sources[1].classes = list(CLASSES)  # type: ignore[index]
    changed.output_dir = nomask.output_dir
    assert changed == nomask


def test_source_config_alone() -> None:
    src = SourceConfig(name="x", format="isic2019", root="r", where={"split": ["a"]})
    assert src.columns.image == "image_id"
