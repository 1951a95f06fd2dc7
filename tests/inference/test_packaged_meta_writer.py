"""The one writer of ``model.json``: what it writes reads back, and a description the loader
would refuse is never written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_tiny_packaged

from skinlesion.core.errors import CheckpointError
from skinlesion.inference.packaged_meta import (
    MODEL_FILE,
    read_packaged_meta,
    write_packaged_meta,
)


def test_written_model_json_reads_back(tmp_path: Path) -> None:
    folder = make_tiny_packaged(tmp_path, "w")
    meta = read_packaged_meta(folder)
    meta["tta"] = 4
    write_packaged_meta(folder, meta)
    assert read_packaged_meta(folder) == meta
    assert not list(folder.glob(".*.tmp"))


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"tta": 9}, "tta is 9"),
        ({"members": []}, "members is []"),
        ({"weights_sha256": "abc"}, "weights_sha256 is 'abc'"),
        ({"format": "other"}, "format must be"),
    ],
)
def test_a_description_the_loader_refuses_is_not_written(
    tmp_path: Path, change: dict, named: str
) -> None:
    folder = make_tiny_packaged(tmp_path, "w")
    before = (folder / MODEL_FILE).read_text()
    meta = {**json.loads(before), **change}
    with pytest.raises(CheckpointError, match="not written") as err:
        write_packaged_meta(folder, meta)
    assert named in str(err.value)
    assert (folder / MODEL_FILE).read_text() == before
