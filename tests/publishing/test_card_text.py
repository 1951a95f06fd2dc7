"""The card's known limits follow what the model was trained on."""

from __future__ import annotations

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
