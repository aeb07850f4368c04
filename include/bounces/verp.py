"""The envelope sender that carries its delivery (VERP): ``TRIGGERS_BOUNCE_ADDRESS``.

The setting is a template such as ``bounces+{delivery_id}@shop.example.com``; each message's
``MAIL FROM`` is that address with its delivery id, so a bounce, whatever its form, comes back
to an address that names the delivery. Unset: the envelope sender is the connection's
``from_email``, else the campaign's sender, as before.
"""

from __future__ import annotations

import os
import re

from include.errors import ConfigError, InvalidEmailError
from include.suppressions.addresses import normalize_email

BOUNCE_ADDRESS_ENV = "TRIGGERS_BOUNCE_ADDRESS"
PLACEHOLDER = "{delivery_id}"
# a delivery id is 32 hex digits (matching.decisions.delivery_ids); tests use short ones
_SAMPLE_ID = "0" * 32
_DELIVERY_ID = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"


def bounce_address_template(value: str | None = None) -> str | None:
    """The checked template (``value``, else the environment's), or None when it is unset.

    :class:`ConfigError` names the setting when it does not hold ``{delivery_id}`` exactly once in
    its local part, or does not make one plain address with a local part of at most 64 characters.
    """
    template = (os.environ.get(BOUNCE_ADDRESS_ENV) if value is None else value) or ""
    template = template.strip()
    if not template:
        return None
    local, at, _domain = template.rpartition("@")
    if template.count(PLACEHOLDER) != 1 or PLACEHOLDER not in local or not at:
        raise ConfigError(
            f"{BOUNCE_ADDRESS_ENV} {template[:100]!r} must hold {PLACEHOLDER} once, in its local part: "
            f"e.g. bounces+{PLACEHOLDER}@shop.example.com (or unset it)"
        )
    try:
        normalize_email(template.replace(PLACEHOLDER, _SAMPLE_ID))
    except InvalidEmailError:
        raise ConfigError(
            f"{BOUNCE_ADDRESS_ENV} {template[:100]!r} does not make one valid address with a 32-digit "
            "delivery id (plain local@domain, local part at most 64 characters)"
        ) from None
    return template


def bounce_address_for(template: str, delivery_id: str) -> str:
    """The envelope sender of ``delivery_id``'s message (``template`` already checked)."""
    return normalize_email(template.replace(PLACEHOLDER, delivery_id))


def delivery_id_pattern(template: str) -> re.Pattern[str]:
    """Finds the delivery id in an address made from ``template`` (case-insensitive, as mail
    systems may change the case of a local part)."""
    prefix, _, suffix = template.partition(PLACEHOLDER)
    return re.compile(
        rf"(?<![A-Za-z0-9_.+-]){re.escape(prefix)}({_DELIVERY_ID}){re.escape(suffix)}(?![A-Za-z0-9.-])",
        re.IGNORECASE,
    )
