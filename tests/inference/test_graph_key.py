"""The ONNX graph cache's key, table-driven: every input that changes what the cached graph
computes (weights, familiarity, ``model.json``, temperature, TTA, int8, each field of the
preprocessing spec, the class names, the members) gives another key, one change at a time; what
the graph does not read (where the model lies, its card) keeps the key, so a copied model reuses
its graph."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import attach_tiny_familiarity, make_tiny_packaged, spread_images
from safetensors.torch import load_file, save_file

from skinlesion.core.runtime import resolve_runtime
from skinlesion.data.preprocess import Detail
from skinlesion.inference.backend import graph_key
from skinlesion.inference.familiarity import (
    FAMILIARITY_FILE,
    load_familiarities,
    save_familiarities,
)
from skinlesion.inference.packaged import load_packaged
from skinlesion.inference.packaged_meta import MODEL_FILE, WEIGHTS_FILE
from skinlesion.inference.predict import Member
from skinlesion.inference.resolve import resolve_model

CPU = resolve_runtime("cpu")
TTA = 2


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Member]]:
    """A packaged two-member model with a familiarity, and its members as loaded."""
    root = tmp_path_factory.mktemp("graph_key")
    images = spread_images(root / "images", n=9)
    folder = attach_tiny_familiarity(make_tiny_packaged(root, "keyed"), images[:6], images[6:])
    return folder, load_packaged(folder, CPU).members


def _copy(folder: Path, members: list[Member], dest: Path) -> list[Member]:
    """The model's folder copied to ``dest``, and its members pointing there."""
    shutil.copytree(folder, dest)
    return [replace(m, path=dest / Path(m.path).relative_to(folder)) for m in members]


def _new_weights(folder: Path) -> None:
    tensors = load_file(str(folder / WEIGHTS_FILE))
    name = next(k for k, v in tensors.items() if k.endswith("classifier.bias"))
    tensors[name] = tensors[name] + 0.01
    save_file(tensors, str(folder / WEIGHTS_FILE))


def _refit_familiarity(folder: Path) -> None:
    """Another familiarity in the file, ``model.json`` untouched (as a run folder's
    ``fold_K/familiarity.safetensors`` after ``skinlesion fit-familiarity --refit``)."""
    fams = load_familiarities(folder / FAMILIARITY_FILE)
    save_familiarities(
        folder / FAMILIARITY_FILE,
        {p: replace(f, threshold=f.threshold * 2) for p, f in fams.items()},
    )


def _edit_json(name: str, edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        meta = json.loads((folder / name).read_text())
        edit(meta)
        (folder / name).write_text(json.dumps(meta))

    return apply


def _temperature_in_json(meta: dict) -> None:
    meta["members"][0]["temperature"] *= 1.5


# A file of the model's folder changed in a copy: name -> the change.
FILE_CHANGES: dict[str, Callable[[Path], None]] = {
    "weights": _new_weights,
    "familiarity refit": _refit_familiarity,
    "model.json": _edit_json(MODEL_FILE, _temperature_in_json),
}


def _spec(**fields: object) -> Callable[[Member], Member]:
    return lambda m: replace(m, spec=replace(m.spec, **fields))


# A member as loaded, changed in memory (what the key reads of it beside its files).
MEMBER_CHANGES: dict[str, Callable[[Member], Member]] = {
    "temperature": lambda m: replace(m, temperature=m.temperature * 1.5),
    "size": _spec(size=64),
    "non-square size": _spec(size=(48, 64)),
    "mean": _spec(mean=(0.4, 0.5, 0.6)),
    "std": _spec(std=(0.2, 0.3, 0.25)),
    "interpolation": _spec(interpolation="bilinear"),
    "colour constancy": _spec(colour_constancy=True),
    "detail": _spec(detail=Detail(200, 75)),
    "class names": _spec(class_names=("a", "b", "c", "d", "e", "f", "g")),
    "class order": lambda m: replace(m, spec=replace(m.spec, class_names=m.spec.class_names[::-1])),
}


def test_the_model_has_a_key(keyed: tuple[Path, list[Member]]) -> None:
    folder, members = keyed
    key = graph_key(members, TTA, False)
    assert key is not None and key == graph_key(load_packaged(folder, CPU).members, TTA, False)
    assert all(m.familiarity is not None for m in members)  # the familiarity is in the graph


@pytest.mark.parametrize("change", sorted(FILE_CHANGES))
def test_a_changed_file_gives_another_key(
    keyed: tuple[Path, list[Member]], change: str, tmp_path: Path
) -> None:
    folder, members = keyed
    copied = _copy(folder, members, tmp_path / "model")
    assert graph_key(copied, TTA, False) == graph_key(members, TTA, False)  # moved: the same
    FILE_CHANGES[change](tmp_path / "model")
    assert graph_key(copied, TTA, False) != graph_key(members, TTA, False)


@pytest.mark.parametrize("change", sorted(MEMBER_CHANGES))
def test_a_changed_member_gives_another_key(keyed: tuple[Path, list[Member]], change: str) -> None:
    _, members = keyed
    changed = [MEMBER_CHANGES[change](members[0]), *members[1:]]
    assert changed[0] != members[0]
    assert graph_key(changed, TTA, False) != graph_key(members, TTA, False)


def test_views_precision_and_members_each_give_another_key(
    keyed: tuple[Path, list[Member]],
) -> None:
    _, members = keyed
    keys = [
        graph_key(members, TTA, False),
        graph_key(members, 1, False),  # TTA
        graph_key(members, TTA, True),  # int8
        graph_key(members[:1], TTA, False),  # one member fewer (the same weights file)
        graph_key(members[::-1], TTA, False),  # the members' order: their temperatures move
    ]
    assert len(set(keys)) == len(keys)


def test_the_card_and_the_folder_do_not_change_the_key(
    keyed: tuple[Path, list[Member]], tmp_path: Path
) -> None:
    """The graph does not read the card (it is copied beside the graph for a reader), nor the
    folder's place: a copied or re-described model reuses its cached graph."""
    folder, members = keyed
    copied = _copy(folder, members, tmp_path / "elsewhere" / "renamed")
    _edit_json("card.json", lambda card: card.update(intended_use="another text"))(
        tmp_path / "elsewhere" / "renamed"
    )
    assert graph_key(copied, TTA, False) == graph_key(members, TTA, False)


def test_detail_given_to_resolve_model_reaches_the_key(keyed: tuple[Path, list[Member]]) -> None:
    """``--detail`` changes the members in memory only: the graph it runs is another one."""
    folder, members = keyed
    given = resolve_model(folder, CPU, backend="torch", detail="200:75")
    assert given.members[0].spec.detail == Detail(200, 75)
    assert graph_key(given.members, TTA, False) != graph_key(members, TTA, False)
    same = resolve_model(folder, CPU, backend="torch", detail="model")
    assert graph_key(same.members, TTA, False) == graph_key(members, TTA, False)
