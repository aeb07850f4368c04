"""Fixtures of the delivery tests: the default configuration without send throttles, and a
local SMTP server per test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from include.config import DEFAULT_CONFIG_PATH, DEFAULT_TEMPLATES_DIR, TriggersConfig, load_config
from include.sandbox.smtp_server import LocalSmtpServer


@pytest.fixture(scope="module")
def config() -> TriggersConfig:
    loaded = load_config(DEFAULT_CONFIG_PATH, DEFAULT_TEMPLATES_DIR)
    return loaded.model_copy(update={"limits": loaded.limits.model_copy(update={"rate": None})})


@pytest.fixture
def server() -> Iterator[LocalSmtpServer]:
    with LocalSmtpServer() as smtp:
        yield smtp
