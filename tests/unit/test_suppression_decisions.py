"""Matching's audience step with suppressions, without a database: the reason, its scope, its
place among the other audience reasons, and one lookup per batch."""

from __future__ import annotations

import pandas as pd

from include.matching.decisions import attach_suppressions, audience_reasons

FOUND = {("ann@example.com", ""): "unsubscribed", ("bob@example.com", "cart"): "manual"}


def candidates() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "identity": ["S1", "S2", "S2", "S3", "S4", "S5"],
            "campaign_id": ["cart", "cart", "browse", "cart", "cart", "cart"],
            "recipient_id": ["r1", "r2", "r2", "r3", None, "r5"],
            "email": ["Ann@Example.com ", "bob@example.com", "bob@example.com", "ann@example.com", None, "x"],
            "opted_out": [False, False, False, True, False, False],
        }
    )


def test_a_suppression_is_a_reason_after_opted_out_in_its_scope() -> None:
    frame = candidates()
    calls: list[list[str]] = []

    def lookup(emails):
        calls.append(list(emails))
        return FOUND

    attach_suppressions(frame, lookup)
    assert calls == [["Ann@Example.com ", "bob@example.com", "bob@example.com", "ann@example.com", "x"]]
    assert audience_reasons(frame).tolist() == [
        "unsubscribed",  # every campaign, whatever the case and spaces of the address
        "manual",  # this campaign only...
        None,  # ...not another
        "opted_out",  # the audience's own flag first
        "unknown_recipient",
        "invalid_email",
    ]


def test_no_recipient_found_means_no_lookup() -> None:
    frame = candidates().iloc[4:5].copy()
    attach_suppressions(frame, lambda emails: (_ for _ in ()).throw(AssertionError("looked up")))
    assert frame["suppression"].isna().all()
