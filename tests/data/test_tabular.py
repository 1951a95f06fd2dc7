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


def test_ages_checked_in_python_records() -> None:
    from skinlesion.core.errors import DataError
    from skinlesion.data.tabular import age_problem, metadata_table

    assert [age_problem(v) for v in (None, math.nan, "", "unknown", 0, "120", 35.5)] == [None] * 7
    assert age_problem("inf") == "age 'inf' is not a number"
    assert age_problem(120.5) == "age 120.5 is over 120"
    with pytest.raises(DataError, match="image 1: age 500 is over 120"):
        metadata_table([{"age": 60}, {"age": 500}], 2)


def test_unknown_keys_in_python_records_are_named_with_the_known_ones() -> None:
    from skinlesion.core.errors import DataError
    from skinlesion.data.tabular import metadata_table

    with pytest.raises(DataError) as info:
        metadata_table([{"age": 60, "site": "back"}, {"Sex": "male"}], 2)
    problems = info.value.problems
    assert len(problems) == 2
    assert problems[0].startswith("unknown key 'site' (record 0); did you mean localization?")
    assert problems[1].startswith("unknown key 'Sex' (record 1); did you mean sex?")
    assert "age, sex, localization" in problems[0]
    # The same check for a table; a labels file's own columns (HAM10000's) are accepted.
    with pytest.raises(DataError, match="unknown column 'localisation'; did you mean localization"):
        metadata_table(pd.DataFrame({"localisation": ["back"]}), 1)
    ham = pd.DataFrame(
        {
            "lesion_id": ["HAM_1"],
            "image_id": ["ISIC_1"],
            "dx": ["nv"],
            "dx_type": ["histo"],
            "age": [50.0],
            "sex": ["male"],
            "localization": ["back"],
            "dataset": ["vidir_modern"],
        }
    )
    assert metadata_table(ham, 1)["localization"].tolist() == ["back"]
    assert metadata_table([{"image_id": "a1", "age": 50}], 1)["age"].tolist() == [50.0]
