"""The configuration (SPEC section 4): what loads, and errors that name the key, its line and the fix."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from include.config import (
    DEFAULT_CONFIG_PATH,
    DEFAULT_TEMPLATES_DIR,
    load_config,
    parse_config,
    parse_duration,
)
from include.errors import ConfigError

CART = "3e8a2ba7-fccc-49bb-bdac-33ee33cf02bf"
PURCHASE = "9b1f6a52-0c1e-4d5e-8a0e-5f2d7c3b9e40"

VALID = textwrap.dedent(
    f"""\
    pipeline:
      consumer: customer_dev
      topics:
        - name: triggers
          triggers:
            - name: {CART}
              label: cart_abandonment
            - name: {PURCHASE}
              label: purchase
      fetch_size: 1000
      retry_validity: 300s
    campaigns:
      - id: cart_abandonment
        trigger: cart_abandonment
        identity: {{dimension: eVar01, column: shopper_id}}
        where:
          - {{dimension: pageName, op: startswith, value: "checkout"}}
        unless: {{trigger: purchase, within: 30m}}
        dedupe: 24h
        template: cart_abandonment
        sender: "Shop <shop@example.com>"
    limits:
      per_recipient: {{max: 3, per: 24h}}
    """
)


def line_of(text: str, fragment: str) -> int:
    """The 1-based line of the first line containing ``fragment``."""
    return next(number for number, line in enumerate(text.splitlines(), 1) if fragment in line)


def test_the_valid_example_loads_with_durations_in_seconds() -> None:
    config = parse_config(VALID)
    campaign = config.campaigns[0]
    assert campaign.unless is not None and campaign.unless.within == 1800.0
    assert campaign.dedupe == 86400.0
    assert config.pipeline.retry_validity == 300.0
    assert config.limits.per_recipient is not None and config.limits.per_recipient.per == 86400.0
    assert config.trigger_labels == {CART: "cart_abandonment", PURCHASE: "purchase"}
    assert config.trigger_ids_for("purchase") == [PURCHASE]
    assert config.trigger_ids_for(CART) == [CART]  # a campaign may name the triggerId itself
    assert config.dimensions == ("eVar01", "pageName")


def test_the_shipped_default_configuration_and_templates_load() -> None:
    config = load_config(DEFAULT_CONFIG_PATH, DEFAULT_TEMPLATES_DIR)
    assert {c.id for c in config.campaigns} >= {"cart_abandonment"}


def test_a_bad_op_names_the_key_path_its_line_and_the_allowed_ops() -> None:
    text = VALID.replace("op: startswith", "op: like")
    with pytest.raises(ConfigError) as caught:
        parse_config(text, source="triggers.yaml")
    message = str(caught.value)
    assert "campaigns[0].where[0].op" in message
    assert f"line {line_of(text, 'op: like')}" in message
    assert "'like'" in message and "startswith" in message and "exists" in message


def test_an_unknown_trigger_label_is_named_with_the_known_ones() -> None:
    text = VALID.replace("unless: {trigger: purchase", "unless: {trigger: purchased")
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    message = str(caught.value)
    assert "'purchased'" in message
    assert "purchase" in message and "cart_abandonment" in message  # the labels it could have meant


@pytest.mark.parametrize(
    ("original", "bad", "key"),
    [
        ("dedupe: 24h", "dedupe: 24 hours", "campaigns[0].dedupe"),
        ("within: 30m", "within: 30", "campaigns[0].unless.within"),
        ("retry_validity: 300s", "retry_validity: 5w", "pipeline.retry_validity"),
        ("per: 24h}", "per: -1h}", "limits.per_recipient.per"),
    ],
)
def test_a_bad_duration_names_its_key_and_line_and_the_form_expected(
    original: str, bad: str, key: str
) -> None:
    text = VALID.replace(original, bad)
    with pytest.raises(ConfigError) as caught:
        parse_config(text, source="triggers.yaml")
    message = str(caught.value)
    assert key in message
    assert f"line {line_of(text, bad.split(':')[0] + ':')}" in message or re.search(r"line \d+", message)
    assert "<n>s, <n>m, <n>h or <n>d" in message


def test_the_line_given_is_the_line_of_the_bad_value() -> None:
    text = VALID.replace("dedupe: 24h", "dedupe: soon")
    with pytest.raises(ConfigError) as caught:
        parse_config(text, source="triggers.yaml")
    assert f"triggers.yaml line {line_of(text, 'dedupe: soon')}, campaigns[0].dedupe" in str(caught.value)


def test_parse_duration_units() -> None:
    assert parse_duration("45s") == 45.0
    assert parse_duration("30m") == 1800.0
    assert parse_duration("2h") == 7200.0
    assert parse_duration("3d") == 259200.0
    assert parse_duration("1.5h") == 5400.0
    for bad in ("", "10", "10x", "m", 30, None):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_a_missing_template_set_names_the_set_the_missing_files_and_the_setting(tmp_path: Path) -> None:
    config_path = tmp_path / "triggers.yaml"
    config_path.write_text(VALID.replace("template: cart_abandonment", "template: no_such_set"))
    with pytest.raises(ConfigError) as caught:
        load_config(config_path, DEFAULT_TEMPLATES_DIR)
    message = str(caught.value)
    assert "campaigns[0].template" in message and "'no_such_set'" in message
    assert "no_such_set.subject.j2" in message and "no_such_set.html.j2" in message
    assert "TRIGGERS_TEMPLATES" in message


def test_a_template_set_missing_one_part_is_refused(tmp_path: Path) -> None:
    for part in ("subject", "txt"):  # no html
        (tmp_path / f"cart_abandonment.{part}.j2").write_text("x")
    config_path = tmp_path / "triggers.yaml"
    config_path.write_text(VALID)
    with pytest.raises(ConfigError, match=r"cart_abandonment\.html\.j2"):
        load_config(config_path, tmp_path)


def test_the_wildcard_trigger_accepts_every_trigger_and_a_campaign_may_use_it() -> None:
    text = VALID.replace(
        f"- name: {CART}\n          label: cart_abandonment", '- name: "*"\n          label: any_trigger'
    )
    text = text.replace("trigger: cart_abandonment", "trigger: any_trigger")
    config = parse_config(text)
    assert config.accepts_all_triggers
    assert config.trigger_ids_for("any_trigger") == ["*"]
    assert config.trigger_ids_for("*") == ["*"]


@pytest.mark.parametrize(
    ("condition", "expected"),
    [
        ("{dimension: pageName, op: in, value: checkout}", "op 'in' needs a list value"),
        ("{dimension: pageName, op: eq}", "op 'eq' needs a value"),
        ("{dimension: pageName, op: gt, value: lots}", "op 'gt' compares numbers"),
        ("{dimension: pageName, op: startswith, value: x, extra: 1}", "campaigns[0].where[0].extra"),
    ],
)
def test_conditions_that_cannot_be_evaluated_are_refused(condition: str, expected: str) -> None:
    text = VALID.replace('{dimension: pageName, op: startswith, value: "checkout"}', condition)
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    assert expected in str(caught.value)


def test_every_op_is_accepted() -> None:
    for op, value in [
        ("eq", "a"),
        ("ne", "a"),
        ("in", "[a, b]"),
        ("gt", "1"),
        ("ge", "1.5"),
        ("lt", "2"),
        ("le", "2"),
        ("startswith", "a"),
        ("contains", "a"),
        ("exists", "null"),
    ]:
        text = VALID.replace('op: startswith, value: "checkout"', f"op: {op}, value: {value}")
        assert parse_config(text).campaigns[0].where[0].op == op


def test_an_identity_needs_exactly_one_source() -> None:
    text = VALID.replace(
        "{dimension: eVar01, column: shopper_id}", "{dimension: eVar01, field: mcId, column: shopper_id}"
    )
    with pytest.raises(ConfigError, match="exactly one of 'dimension'"):
        parse_config(text)


def test_not_yaml_and_not_a_mapping_are_clear_errors() -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_config("pipeline: [unclosed", source="x.yaml")
    with pytest.raises(ConfigError, match="must be a mapping"):
        parse_config("- a list", source="x.yaml")
