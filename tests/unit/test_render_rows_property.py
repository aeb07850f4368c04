"""Preparing a delivery row never raises (issue 12): whatever its data, a row renders to a message
or to the reason it cannot go, so one bad row fails alone and never stops the run."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from include.config import DEFAULT_TEMPLATES_DIR
from include.delivery.render import RenderedEmail
from include.delivery.render_pool import RECIPIENT_COLUMNS, CampaignSpec, RowRenderer

CAMPAIGNS = {
    "cart_abandonment": CampaignSpec("cart_abandonment", "cart_abandonment", "Shop <shop@example.com>")
}
RENDERER = RowRenderer(
    DEFAULT_TEMPLATES_DIR, "unsubscribe@example.com", "https://x.test/u?d={delivery_id}", CAMPAIGNS
)

# text as it can reach us: lone surrogates, NUL, controls, any code point
any_text = st.text(st.characters(codec=None, categories=None), max_size=40)
any_value = st.one_of(
    st.none(),
    any_text,
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
)
payloads = st.one_of(
    st.none(),
    any_text,
    st.recursive(
        st.one_of(st.none(), st.booleans(), st.floats(), any_text),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(any_text, inner, max_size=3),
        max_leaves=10,
    ).map(lambda value: json.dumps(value, allow_nan=True)),
)


@settings(max_examples=300, deadline=None)
@given(
    recipient=st.fixed_dictionaries({f"r_{c}": any_value for c in RECIPIENT_COLUMNS}),
    email=st.one_of(st.none(), any_text, st.just("person@example.org")),
    event_time=any_value,
    payload=payloads,
    delivery_id=any_text,
    trigger_id=any_value,
)
def test_any_row_renders_or_says_why_not(
    recipient: dict[str, Any], email: Any, event_time: Any, payload: Any, delivery_id: str, trigger_id: Any
) -> None:
    row = {
        **recipient,
        "delivery_id": delivery_id,
        "campaign_id": "cart_abandonment",
        "recipient_id": recipient["r_recipient_id"],
        "email": email,
        "event_time": event_time,
        "e_payload": payload,
        "e_trigger_id": trigger_id,
    }
    [outcome] = RENDERER.render_rows([row])
    if isinstance(outcome, RenderedEmail):
        outcome.data.decode("ascii")  # what goes on the wire is 7-bit
    else:
        assert outcome[0] in {"invalid_email", "template_error", "render_error"}
