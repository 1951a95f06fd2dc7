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
    spec = fit_metadata_spec(TRAIN, FIELDS)
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
    spec = fit_metadata_spec(TRAIN, FIELDS)
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
    spec = fit_metadata_spec(TRAIN, ("sex", "age"))
    plain = spec.to_dict()
    assert all(isinstance(v, list) for v in plain["vocab"].values())
    assert MetadataSpec.from_dict(plain) == spec
    assert spec.columns()[:4] == ["sex=female", "sex=male", "sex=unknown", "sex_missing"]


def test_parsers() -> None:
    assert parse_age(" 45 ") == 45.0
    assert parse_age("n/a") is None and parse_age(-3) is None and parse_age(math.nan) is None
    assert normalise_category(" Lower Extremity ") == "lower extremity"
    assert normalise_category("Unknown") is None and normalise_category(math.nan) is None


def test_unknown_field_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown field"):
        fit_metadata_spec(TRAIN, ("age", "weight"))
