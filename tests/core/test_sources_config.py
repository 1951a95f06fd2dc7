"""``data.sources``: a strict list of labelled sets; every fault names the key and the source,
and a set is held to the same rules at the top of ``data`` as in a source."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from skinlesion.core.config import (
    ConfigError,
    build_config,
    config_to_dict,
    load_config,
    save_config,
)
from skinlesion.core.labels import CLASSES
from skinlesion.core.sources import SINGLE_SOURCE_KEYS, LabelledSetConfig, SourceConfig

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


# -- one schema for a labelled set: the top of data and a source alike ----------------------------


def _fault(tree: dict) -> str:
    """The one line of a config refused, after ``invalid configuration (config): ``."""
    with pytest.raises(ConfigError) as info:
        build_config(tree)
    text = str(info.value)
    assert "\n" not in text
    return text.split(": ", 1)[1]


FAULTY_SETS = [
    # A fixed layout under root: keys of another format are refused, not silently ignored.
    ({"format": "ham10000", "root": "h", "images": "i"}, "images: not a key of format=ham10000"),
    ({"format": "ham10000", "root": "h", "columns": {"image": "x"}}, "columns applies to"),
    ({"format": "ham10000", "root": "h", "where": {"split": "a"}}, "where applies to"),
    ({"format": "isic2019", "root": "r", "labels": "l.csv"}, "labels: not a key of"),
    ({"format": "csv", "root": "r", "images": "i", "labels": "l"}, "root: not a key of"),
    ({"format": "csv", "images": "i"}, "format=csv needs labels"),
    ({"format": "csv", "images": "i", "labels": "l", "classes": ["nv", "nv"]}, "classes"),
    ({"format": "csv", "images": "i", "labels": "l", "max_images": 3}, "max_images"),
]


@pytest.mark.parametrize(("entry", "fragment"), FAULTY_SETS, ids=[f for _, f in FAULTY_SETS])
def test_a_faulty_set_is_refused_alike_at_the_top_and_in_a_source(
    entry: dict, fragment: str
) -> None:
    """The same message, its keys named by their place: ``data.images`` at the top of ``data``,
    ``data.sources[0] (s): images`` in a source."""
    top = _fault({"data": entry})
    in_source = _fault({"data": {"sources": [{"name": "s", **entry}]}})
    assert in_source.startswith("data.sources[0] (s): ")
    assert top.startswith("data.")
    assert top.replace("data.", "") == in_source.removeprefix("data.sources[0] (s): ")
    assert fragment in in_source


@pytest.mark.parametrize(
    "entry",
    [
        {"format": "ham10000", "root": "h", "labels": "m.csv", "classes": ["mel", "nv"]},
        {"format": "isic2019", "root": "r", "where": {"split": ["a"]}, "max_images": 10},
        {"format": "csv", "images": "i", "labels": "l", "columns": {"group": "patient"}},
    ],
)
def test_a_good_set_is_accepted_alike_at_the_top_and_in_a_source(entry: dict) -> None:
    top = build_config({"data": entry}).data
    source = build_config({"data": {"sources": [{"name": "s", **entry}]}}).data.sources
    assert source is not None
    assert top.labelled_sets() == [top]
    keys = set(SINGLE_SOURCE_KEYS)
    assert top.model_dump(include=keys) == source[0].model_dump(exclude={"name"})


def test_only_the_top_may_leave_its_root_to_the_data_check() -> None:
    """The defaults describe HAM10000 at a root given later (``data.root=...``), so an unset
    root at the top is refused when the data is checked; a source names its files at once."""
    assert load_config(None, ["data.format=isic2019"]).data.root is None
    assert "(s): format=isic2019 needs root" in _error(_sources("{name: s, format: isic2019}"))


def test_the_set_keys_are_those_of_the_one_schema() -> None:
    assert tuple(LabelledSetConfig.model_fields) == SINGLE_SOURCE_KEYS
    assert list(SourceConfig.model_fields) == ["name", *SINGLE_SOURCE_KEYS]
