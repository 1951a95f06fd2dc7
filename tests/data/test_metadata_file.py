"""The metadata CSV of ``predict --metadata``: rows matched to images, faults with their lines."""

import pandas as pd
import pytest

from skinlesion.core.errors import DataError
from skinlesion.data.metadata_file import read_metadata_csv


def _meta_csv(tmp_path, text: str):
    path = tmp_path / "meta.csv"
    path.write_text(text)
    return path


def test_metadata_rows_match_a_stem_or_a_file_name(tmp_path, caplog) -> None:
    images = ["imgs/a1.jpg", "imgs/a2.jpg", "imgs/a3.jpg", "other/b.png"]
    path = _meta_csv(
        tmp_path,
        "image_id,age,sex\na1.jpg,61,male\nzz9,40,female\na2,,female\nimgs/a3.jpg,70,\n",
    )
    with caplog.at_level("WARNING"):
        table = read_metadata_csv(path, images)
    assert table.index.tolist() == [0, 1, 2, 3]
    assert table["age"].tolist()[:3] == ["61", "", "70"] and pd.isna(table["age"][3])
    assert table["sex"].tolist()[:3] == ["male", "female", ""]
    # The row that names no image, and the image without a row, are both reported.
    assert f"{path}: 1 row(s) name none of the images, not used (lines 3)" in caplog.text
    assert "no row for 1 image(s), predicted without metadata: other/b.png" in caplog.text


def test_metadata_faults_are_listed_together_with_their_lines(tmp_path) -> None:
    images = ["a1.jpg", "a2.jpg", "a3.jpg", "a4.jpg"]
    path = _meta_csv(
        tmp_path,
        "image_id,age,sex\n"
        "a1,sixty,male\n"  # line 2
        "a2,-4,female\n"  # line 3
        "a3,500,female\n"  # line 4
        "A4.png,50,male\n"  # line 5: meant for a4.jpg
        "a3.jpg,40,male\n"  # line 6: a3 again, by its file name
        ",30,male\n",  # line 7
    )
    with pytest.raises(DataError) as info:
        read_metadata_csv(path, images)
    assert info.value.title == f"{path}: invalid metadata"
    assert sorted(info.value.problems) == sorted(
        [
            "line 2 (image_id a1): age 'sixty' is not a number",
            "line 3 (image_id a2): age -4 is negative",
            "line 4 (image_id a3): age 500 is over 120",
            "line 5: no image named A4.png; did you mean a4?",
            "image a3.jpg is named on several lines: 4 (a3), 6 (a3.jpg)",
            f"{path} line 7: empty image_id",
        ]
    )
    dup = _meta_csv(tmp_path, "image_id,age\na1,50\na1,51\n")
    with pytest.raises(DataError, match="image_id a1 on lines 2, 3"):
        read_metadata_csv(dup, images)
