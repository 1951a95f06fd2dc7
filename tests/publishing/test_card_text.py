"""The card's known limits follow what the model was trained on."""

from __future__ import annotations

import json

from skinlesion.inference.packaged import default_name, zoo_dir
from skinlesion.publishing.card_text import KNOWN_LIMITS, MULTI_SOURCE_LIMITS, known_limits


def test_single_source_card_says_ham10000_only() -> None:
    limits = known_limits({"data": {"format": "ham10000", "sources": None}})
    assert limits == KNOWN_LIMITS and "HAM10000 only" in limits[0]


def test_multi_source_card_says_in_domain_not_ham10000_only() -> None:
    config = {"data": {"sources": [{"name": "ham10000"}, {"name": "isic2017"}]}}
    limits = known_limits(config)
    assert limits == MULTI_SOURCE_LIMITS
    assert not any("HAM10000 only" in line for line in limits)
    assert any("IN-DOMAIN" in line for line in limits)


def test_config_without_data_section_is_single_source() -> None:
    assert known_limits({}) == KNOWN_LIMITS


def test_card_shows_the_share_predicted_as_absent_classes_where_a_set_lacks_some() -> None:
    from skinlesion.publishing.card_text import render_card

    card = json.loads((zoo_dir() / str(default_name()) / "card.json").read_text())
    sets = card["metrics"]
    for figures in sets.values():  # as for a card whose sets all have every class
        figures["predicted_absent"] = figures["predicted_absent_ci95"] = None
    assert "| predicted as a class the set lacks |" not in render_card(card)
    last = list(sets)[-1]
    sets[last]["predicted_absent"], sets[last]["predicted_absent_ci95"] = 0.245, [0.21, 0.28]
    lines = render_card(card).splitlines()
    row = next(line for line in lines if line.startswith("| predicted as a class the set lacks"))
    assert row.endswith("| 0.245 [0.210, 0.280] |") and "n/a" in row
