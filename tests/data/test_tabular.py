import math

import numpy as np
import pandas as pd
import pytest

from skinlesion.core.errors import ConfigError
from skinlesion.data.tabular import (
    MetadataSpec,
    encode_metadata,
    fit_metadata_spec,
    missing_vector,
    normalise_category,
    parse_age,
    unseen_values,
)

FIELDS = ("age", "sex", "localization")
TRAIN = pd.DataFrame(
    {
        "age": ["40.0", "60.0", "", "50"],
        "sex": ["male", " Female", "unknown", "male"],
        "localization": ["back", "face", "back", None],
    }
)


def test_spec_fitted_on_training_values() -> None:
    spec = fit_metadata_spec(TRAIN, FIELDS, "as_is")
    assert spec.age_mean == pytest.approx(50.0)
    assert spec.age_std == pytest.approx(np.std([40.0, 60.0, 50.0]))
    # Sorted, normalised vocabularies; HAM10000's "unknown" is a missing value, not a category.
    assert spec.vocabulary == {"sex": ("female", "male"), "localization": ("back", "face")}
    assert spec.columns() == [
        "age",
        "age_missing",
        "sex=female",
        "sex=male",
        "sex=unknown",
        "sex_missing",
        "localization=back",
        "localization=face",
        "localization=unknown",
        "localization_missing",
    ]
    assert spec.dim == 10


def test_known_values_unseen_and_missing() -> None:
    spec = fit_metadata_spec(TRAIN, FIELDS, "as_is")
    new = pd.DataFrame(
        {
            "age": [60.0, math.nan],
            "sex": ["MALE ", "unknown"],
            "localization": ["palms/soles", ""],
        }
    )
    got = encode_metadata(new, spec)
    z = 10.0 / np.std([40.0, 60.0, 50.0])
    # An unseen site maps to "unknown" but is not missing; an empty one is both.
    assert got[0].tolist() == pytest.approx([z, 0, 0, 1, 0, 0, 0, 0, 1, 0])
    assert got[1].tolist() == [0, 1, 0, 0, 1, 1, 0, 0, 1, 1]
    assert got[1].tolist() == missing_vector(spec).tolist()


def test_absent_columns_and_no_table_are_all_missing() -> None:
    spec = fit_metadata_spec(TRAIN, FIELDS)
    only_age = encode_metadata(pd.DataFrame({"age": [50.0]}), spec)
    assert only_age[0].tolist() == [0, 0, *missing_vector(spec)[2:].tolist()]
    assert encode_metadata(None, spec, n=3).tolist() == [missing_vector(spec).tolist()] * 3


def test_spec_round_trips_through_plain_types() -> None:
    spec = fit_metadata_spec(TRAIN, ("sex", "age", "localization"))
    plain = spec.to_dict()
    assert all(isinstance(v, list) for v in plain["vocab"].values())
    assert plain["sites"] == "general"
    assert MetadataSpec.from_dict(plain) == spec
    assert spec.columns()[:4] == ["sex=female", "sex=male", "sex=unknown", "sex_missing"]
    # A spec saved before sites were mapped kept each dataset's names.
    del plain["sites"]
    assert MetadataSpec.from_dict(plain).sites == "as_is"


HAM_SITES = pd.DataFrame(
    {"localization": ["back", "chest", "abdomen", "trunk", "face", "scalp", "foot", "acral"]}
)


def test_general_sites_map_ham10000_names_to_isic_general_sites() -> None:
    spec = fit_metadata_spec(HAM_SITES, ["localization"])
    assert spec.sites == "general"
    assert spec.vocabulary["localization"] == (
        "anterior torso",
        "head/neck",
        "lower extremity",
        "palms/soles",
        "posterior torso",
        "torso",
    )
    isic = pd.DataFrame({"localization": ["posterior torso", "Head/Neck", "lateral torso"]})
    got = encode_metadata(isic, spec)
    names = spec.columns()
    hot = [[names[j] for j in np.flatnonzero(row)] for row in got]
    # ISIC's own names are read; a torso side never seen in training falls back to "torso".
    assert hot == [
        ["localization=posterior torso"],
        ["localization=head/neck"],
        ["localization=torso"],
    ]
    assert unseen_values(isic, spec) == {}
    # HAM10000's names encode exactly as their general sites.
    ham = encode_metadata(pd.DataFrame({"localization": ["back", "ear"]}), spec)
    same = encode_metadata(pd.DataFrame({"localization": ["posterior torso", "head/neck"]}), spec)
    assert ham.tolist() == same.tolist()


def test_as_is_sites_keep_names_and_unseen_values_are_counted() -> None:
    spec = fit_metadata_spec(HAM_SITES, ["localization"], "as_is")
    assert "back" in spec.vocabulary["localization"]
    isic = pd.DataFrame({"localization": ["posterior torso", "posterior torso", "back", None]})
    assert unseen_values(isic, spec) == {"localization": {"posterior torso": 2}}
    assert (
        encode_metadata(isic, spec)[0].tolist()
        == encode_metadata(pd.DataFrame({"localization": ["somewhere else"]}), spec)[0].tolist()
    )
    # Without a torso level to fall back on, a torso side is unseen under general sites too.
    no_torso = fit_metadata_spec(pd.DataFrame({"localization": ["back"]}), ["localization"])
    assert unseen_values(pd.DataFrame({"localization": ["lateral torso"]}), no_torso) == {
        "localization": {"lateral torso": 1}
    }


def test_bad_site_mode_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"model.metadata_sites: 'isic'; expected one of"):
        fit_metadata_spec(HAM_SITES, ["localization"], "isic")


def test_parsers() -> None:
    assert parse_age(" 45 ") == 45.0
    assert parse_age("n/a") is None and parse_age(-3) is None and parse_age(math.nan) is None
    assert normalise_category(" Lower Extremity ") == "lower extremity"
    assert normalise_category("Unknown") is None and normalise_category(math.nan) is None


def test_unknown_field_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown field"):
        fit_metadata_spec(TRAIN, ("age", "weight"))


def _meta_csv(tmp_path, text: str):
    path = tmp_path / "meta.csv"
    path.write_text(text)
    return path


def test_metadata_rows_match_a_stem_or_a_file_name(tmp_path, caplog) -> None:
    from skinlesion.data.tabular import read_metadata_csv

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
    from skinlesion.core.errors import DataError
    from skinlesion.data.tabular import read_metadata_csv

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


def test_ages_checked_in_python_records() -> None:
    from skinlesion.core.errors import DataError
    from skinlesion.data.tabular import age_problem, metadata_table

    assert [age_problem(v) for v in (None, math.nan, "", "unknown", 0, "120", 35.5)] == [None] * 7
    assert age_problem("inf") == "age 'inf' is not a number"
    assert age_problem(120.5) == "age 120.5 is over 120"
    with pytest.raises(DataError, match="image 1: age 500 is over 120"):
        metadata_table([{"age": 60}, {"age": 500}], 2)
