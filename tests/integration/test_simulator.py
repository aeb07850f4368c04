"""The Adobe pipeline simulator over real HTTP: IMS (JWT and OAuth), the journal protocol, faults,
the generated events, the audience CSV, and the key-pair command."""

from __future__ import annotations

import csv
import json
import re
import signal
import stat
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import jwt
import pytest
import requests

from include.errors import ConfigError, CredentialsError
from include.sandbox.keys import connection_json, create_key_pair
from include.sandbox.simulator.events import BROWSE_ABANDONMENT, CART_ABANDONMENT, PURCHASE
from include.sandbox.simulator.options import SimulatorOptions
from include.sandbox.simulator.population import person_identity, write_audience_csv
from include.sandbox.simulator.server import Simulator
from tests.conftest import ROOT

TRIGGER_KEY = "com.adobe.mcloud.protocol.trigger"
MESSAGE_KEY = "com.adobe.mcloud.pipeline.pipelineMessage"


@pytest.fixture(scope="module")
def key_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return create_key_pair(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def other_key_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return create_key_pair(tmp_path_factory.mktemp("other-keys"))


@pytest.fixture
def sim(key_pair, request):
    options = {"events": 250, **getattr(request, "param", {})}
    with Simulator(SimulatorOptions(public_key_pem=key_pair[1].read_bytes(), **options)) as simulator:
        yield simulator


def jwt_for(sim: Simulator, private_pem: bytes, **claim_overrides) -> str:
    now = int(time.time())
    claims = {
        "iss": sim.options.org_id,
        "sub": sim.options.technical_account_id,
        "aud": f"{sim.url}/c/{sim.options.client_id}",
        "iat": now,
        "exp": now + 600,
        f"{sim.url}/s/ent_analytics_bulk_ingest_sdk": True,
    }
    claims.update(claim_overrides)
    return jwt.encode({k: v for k, v in claims.items() if v is not None}, private_pem, algorithm="RS256")


def exchange(sim: Simulator, token: str, secret: str | None = None) -> requests.Response:
    return requests.post(
        f"{sim.url}/ims/exchange/jwt",
        data={
            "client_id": sim.options.client_id,
            "client_secret": secret if secret is not None else sim.options.client_secret,
            "jwt_token": token,
        },
        timeout=10,
    )


def oauth(sim: Simulator, secret: str | None = None) -> requests.Response:
    return requests.post(
        f"{sim.url}/ims/token/v3",
        data={
            "grant_type": "client_credentials",
            "client_id": sim.options.client_id,
            "client_secret": secret if secret is not None else sim.options.client_secret,
            "scope": "ent_analytics_bulk_ingest_sdk,openid",
        },
        timeout=10,
    )


class Journal:
    """A minimal journal reader: the headers of SPEC section 2 on one keep-alive session."""

    def __init__(self, sim: Simulator, consumer: str | None = None, token: str | None = None):
        self.sim = sim
        self.session = requests.Session()
        token = token or oauth(sim).json()["access_token"]
        self.session.headers.update(
            {
                "Authorization": f"Bearer {token}",
                "x-api-key": sim.options.client_id,
                "x-ims-org-id": sim.options.org_id,
            }
        )
        self.url = f"{sim.url}/journal/{consumer or sim.options.consumer}"

    def get(self, **params) -> requests.Response:
        params.setdefault("limit", 100)
        return self.session.get(self.url, params=params, timeout=10)

    def drain(self, limit: int = 100) -> list[dict]:
        items, since = [], None
        while (response := self.get(limit=limit, **({"since": since} if since else {}))).status_code == 200:
            body = response.json()
            items += body["events"]
            since = body["_page"]["last"]
        assert response.status_code == 204, response.text
        return items


def trigger_of(event: dict) -> dict:
    """The trigger object of an envelope or of the bare form."""
    return event["event"][MESSAGE_KEY][TRIGGER_KEY] if "event_id" in event else event


def dimensions_of(event: dict) -> dict:
    return {
        name.strip(): value
        for name, value in trigger_of(event)["enrichments"]["analyticsHitSummary"]["dimensions"].items()
    }


# --- IMS --------------------------------------------------------------------------------------


def test_jwt_exchange_returns_a_working_token_with_expires_in_milliseconds(key_pair):
    options = SimulatorOptions(public_key_pem=key_pair[1].read_bytes(), token_lifetime=3600, events=3)
    with Simulator(options) as sim:
        response = exchange(sim, jwt_for(sim, key_pair[0].read_bytes()))
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["token_type"] == "bearer" and body["expires_in"] == 3_600_000
        assert Journal(sim, token=body["access_token"]).get().status_code == 200
        assert sim.stats["tokens_issued"] == 1


def test_jwt_signed_with_another_key_is_refused_as_invalid_signature(sim, other_key_pair):
    response = exchange(sim, jwt_for(sim, other_key_pair[0].read_bytes()))
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_signature"


@pytest.mark.parametrize(
    ("claims", "error"),
    [
        ({"exp": int(time.time()) - 120}, "expired_token"),
        ({"exp": int(time.time()) + 2 * 86400}, "invalid_token"),  # more than 24 h after iat
        ({"aud": "https://ims-na1.adobelogin.com/c/sim-client"}, "invalid_token"),
        ({"iss": "SOMEONE-ELSE@AdobeOrg"}, "invalid_token"),
        ({"sub": "nobody@techacct.adobe.com"}, "invalid_token"),
    ],
)
def test_jwt_with_bad_claims_is_refused_naming_the_problem(sim, key_pair, claims, error):
    response = exchange(sim, jwt_for(sim, key_pair[0].read_bytes(), **claims))
    assert response.status_code == 400
    assert response.json()["error"] == error and response.json()["error_description"]


def test_jwt_without_a_metascope_claim_is_refused(sim, key_pair):
    token = jwt_for(sim, key_pair[0].read_bytes(), **{f"{sim.url}/s/ent_analytics_bulk_ingest_sdk": None})
    assert exchange(sim, token).json()["error"] == "invalid_scope"


def test_wrong_client_secret_is_401_invalid_client_in_both_modes(sim, key_pair):
    wrong = "not-the-secret-42"
    for response in (exchange(sim, jwt_for(sim, key_pair[0].read_bytes()), secret=wrong), oauth(sim, wrong)):
        assert response.status_code == 401
        assert response.json()["error"] == "invalid_client"
        assert wrong not in response.text


def test_oauth_returns_expires_in_seconds(key_pair):
    with Simulator(SimulatorOptions(token_lifetime=3600)) as sim:
        body = oauth(sim).json()
        assert body["token_type"] == "bearer" and body["expires_in"] == 3600 and body["access_token"]


def test_jwt_exchange_without_a_configured_public_key_says_how_to_fix_it():
    with Simulator(SimulatorOptions()) as sim:
        response = exchange(sim, jwt_for(sim, create_key_pair_in_memory()))
        assert response.status_code == 400 and "--public-key" in response.json()["error_description"]


def create_key_pair_in_memory() -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


# --- the journal ------------------------------------------------------------------------------


def test_paging_returns_every_event_in_order_with_opaque_positions_then_204(sim):
    journal = Journal(sim)
    first = journal.get(limit=100)
    assert first.status_code == 200
    body = first.json()
    assert body["_page"] == {"last": body["events"][-1]["position"], "count": 100}
    assert first.headers["Link"] == f'<{journal.url}?since={body["_page"]["last"]}&limit=100>; rel="next"'

    items = journal.drain(limit=100)
    assert len(items) == 250
    positions = [item["position"] for item in items]
    assert len(set(positions)) == 250
    assert not any(re.fullmatch(r"\d+", p) for p in positions)  # opaque, not an index
    as_numbers = [int(p, 16) for p in positions]
    assert as_numbers != sorted(as_numbers)  # no order or arithmetic to be read from them
    offsets = [item["event"]["event"]["offset"] for item in items if "event_id" in item["event"]]
    assert offsets == sorted(offsets)  # journal order

    drained = journal.get(since=positions[-1])
    assert drained.status_code == 204 and float(drained.headers["Retry-After"]) > 0
    sim.publish(3)
    more = journal.get(since=positions[-1]).json()["events"]
    assert len(more) == 3 and more[0]["position"] not in positions


def test_latest_starts_at_the_end_and_links_to_what_comes_next(sim):
    journal = Journal(sim)
    latest = journal.get(latest="true")
    assert latest.status_code == 204
    link = re.search(r"since=([^&>]+)", latest.headers["Link"]).group(1)
    assert journal.get(since=link).status_code == 204
    sim.publish(5)
    assert len(journal.get(since=link).json()["events"]) == 5


def test_credentials_and_request_checks(sim):
    journal = Journal(sim)
    assert Journal(sim, consumer="someone_else").get().status_code == 403
    assert (
        journal.session.get(journal.url, params={"limit": 10}, headers={"Authorization": ""}).status_code
        == 401
    )
    assert (
        journal.session.get(
            journal.url, params={"limit": 10}, headers={"Authorization": "Bearer forged"}
        ).status_code
        == 401
    )
    assert (
        journal.session.get(journal.url, params={"limit": 10}, headers={"x-api-key": "other"}).status_code
        == 403
    )
    assert (
        journal.session.get(
            journal.url, params={"limit": 10}, headers={"x-ims-org-id": "X@AdobeOrg"}
        ).status_code
        == 403
    )
    for limit in (0, 100_001, "ten"):
        assert journal.get(limit=limit).status_code == 400
    assert journal.session.get(journal.url, timeout=10).status_code == 400  # no limit
    for since in ("garbled-position", "0000000000000000", "1"):
        response = journal.get(since=since)
        assert response.status_code == 400 and response.json()["error"] == "invalid_position"


@pytest.mark.parametrize("sim", [{"events": 50, "retention": 20}], indirect=True)
def test_a_position_older_than_the_retention_is_410_gone(sim):
    journal = Journal(sim)
    oldest = journal.get(limit=5).json()["events"]
    assert [i["event"]["event"]["offset"] for i in oldest] == [500_000_030 + k for k in range(5)]
    assert journal.get(since=oldest[0]["position"]).status_code == 200
    sim.publish(30)
    gone = journal.get(since=oldest[0]["position"])
    assert gone.status_code == 410 and "purged" in gone.json()["error_description"]
    assert len(journal.drain()) == 20  # without since: from the oldest retained event


def test_memory_holds_only_the_retained_positions():
    with Simulator(SimulatorOptions(events=20_000, retention=500)) as sim:
        sim.publish(10_000)
        assert sim.journal.first_retained == 29_500
        assert len(sim.journal._slots) < 10_000  # trimmed, not kept forever


# --- faults -----------------------------------------------------------------------------------


def test_fault_switches_apply_to_the_next_journal_requests(sim):
    journal = Journal(sim)
    sim.faults.fail_next(503, count=2, retry_after=0.5)
    sim.faults.fail_next(429)
    answers = [journal.get() for _ in range(4)]
    assert [a.status_code for a in answers] == [503, 503, 429, 200]
    assert [a.headers.get("Retry-After") for a in answers[:3]] == ["0.5", "0.5", "1"]
    for status in (400, 403, 410, 500):
        sim.faults.fail_next(status)
        assert journal.get().status_code == status
    assert oauth(sim).status_code == 200  # IMS is not affected

    sim.faults.slow_seconds = 0.3
    started = time.monotonic()
    assert journal.get().status_code == 200
    assert time.monotonic() - started >= 0.3
    sim.faults.fail_next(500, count=5)
    sim.faults.clear()
    assert sim.faults.slow_seconds == 0 and journal.get().status_code == 200
    assert sim.stats["journal_requests"][503] == 2


def test_faults_publishing_and_stats_can_be_switched_over_http(sim):
    journal = Journal(sim)
    admin = f"{sim.url}/_sim"
    assert requests.post(f"{admin}/faults", json={"status": 503, "count": 1, "retry_after": 2}, timeout=5).ok
    failed = journal.get()
    assert failed.status_code == 503 and failed.headers["Retry-After"] == "2"
    assert requests.post(f"{admin}/faults", json={"expire_tokens": True}, timeout=5).ok
    assert journal.get().status_code == 401
    journal = Journal(sim)
    flaky = requests.post(f"{admin}/faults", json={"share": 1.0, "share_status": 502}, timeout=5).json()
    assert flaky["flaky"] == {"status": 502, "share": 1.0} and journal.get().status_code == 502
    requests.post(f"{admin}/faults", json={"slow_seconds": 5, "status": 500, "count": 9}, timeout=5)
    assert requests.post(f"{admin}/faults", json={"clear": True}, timeout=5).json() == {
        "pending": [],
        "slow_seconds": 0.0,
        "flaky": None,
    }
    assert requests.post(f"{admin}/publish", json={"count": 7}, timeout=5).json()["length"] == 257
    assert requests.post(f"{admin}/faults", data="not json", timeout=5).status_code == 400
    assert len(journal.drain()) == 257
    stats = requests.get(f"{admin}/stats", timeout=5).json()
    assert (
        stats["events_served"] == 257
        and stats["journal_requests"]["503"] == 1
        and stats["tokens_issued"] == 2
    )


@pytest.mark.parametrize("sim", [{"token_lifetime": 1.0}], indirect=True)
def test_tokens_expire_after_their_lifetime_or_when_told(sim):
    journal = Journal(sim)
    assert journal.get().status_code == 200
    time.sleep(1.1)
    assert journal.get().status_code == 401
    fresh = Journal(sim)
    sim.expire_tokens()
    assert fresh.get().status_code == 401


# --- the events -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sim", [{"events": 2000, "start_time": 1_767_225_600.0, "time_span": 3600.0}], indirect=True
)
def test_events_look_like_adobe_analytics_triggers(sim):
    events = [item["event"] for item in Journal(sim).drain(limit=1000)]
    assert len(events) == 2000
    triggers = Counter(trigger_of(e)["triggerId"] for e in events)
    assert triggers[CART_ABANDONMENT] > triggers[BROWSE_ABANDONMENT] > triggers[PURCHASE] > 100
    assert (
        40
        < sum(n for t, n in triggers.items() if t not in (CART_ABANDONMENT, BROWSE_ABANDONMENT, PURCHASE))
        < 200
    )

    event = events[0]
    header = event["event"][MESSAGE_KEY]["header"]
    trigger = trigger_of(event)
    assert header["imsOrg"] == sim.options.org_id and header["messageType"] == "TRIGGER"
    assert re.fullmatch(
        r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", header["messageId"]
    )
    assert header["messageId"] != event["event_id"]
    assert trigger["triggerTimestamp"] <= header["sentTime"] <= event["event"]["createTime"]
    assert (
        abs(trigger["triggerTimestamp"] / 1000 - 1_767_225_600) < 5
    )  # milliseconds, the first at start_time
    assert re.fullmatch(r"[1-9]\d{37}", trigger["mcId"])
    times = dimensions_of(event)["timeGMT"]["data"]
    assert 2 <= len(times) <= 6 and times == sorted(times) and times[-1] < trigger["triggerTimestamp"] / 1000

    last = trigger_of(events[-1])["triggerTimestamp"] / 1000
    assert 1_767_225_600 + 3500 < last <= 1_767_225_600 + 3600  # spread over time_span
    carts = [dimensions_of(e) for e in events if trigger_of(e)["triggerId"] == CART_ABANDONMENT]
    pages = Counter(d["pageName"]["data"][0] for d in carts if "pageName" in d)
    assert pages.most_common(1)[0][0] == "checkout:cart" and pages["checkout:shipping"] > 0
    browse_pages = {
        d["pageName"]["data"][0]
        for e in events
        if trigger_of(e)["triggerId"] == BROWSE_ABANDONMENT
        for d in [dimensions_of(e)]
        if "pageName" in d
    }
    assert all(p.startswith("product:SKU-") for p in browse_pages)
    assert all(1 <= len(d["products"]["data"]) <= 4 for d in carts if d.get("products", {}).get("data"))

    raw_keys = Counter(
        k for e in events for k in trigger_of(e)["enrichments"]["analyticsHitSummary"]["dimensions"]
    )
    assert raw_keys[" eVar01"] > 0  # stray white space, as in Adobe's own sample
    assert raw_keys["eVar01"] + raw_keys[" eVar01"] < 2000  # now and then a dimension is missing
    assert raw_keys["products"] < 2000 and raw_keys["pageName"] < 2000


@pytest.mark.parametrize("sim", [{"events": 3000, "people": 500}], indirect=True)
def test_repeat_visitors_and_purchases_that_follow_a_cart(sim):
    events = [item["event"] for item in Journal(sim).drain(limit=1000)]
    shoppers = Counter(dimensions_of(e)["eVar01"]["data"][0] for e in events if "eVar01" in dimensions_of(e))
    assert shoppers.most_common(1)[0][1] >= 15  # a few people fire many events
    carts: dict[str, list[tuple[float, list]]] = {}
    followed = 0
    for event in events:
        trigger, dimensions = trigger_of(event), dimensions_of(event)
        if "eVar01" not in dimensions or "products" not in dimensions:
            continue
        shopper, when = dimensions["eVar01"]["data"][0], trigger["triggerTimestamp"] / 1000
        if trigger["triggerId"] == CART_ABANDONMENT:
            carts.setdefault(shopper, []).append((when, dimensions["products"]["data"]))
        elif trigger["triggerId"] == PURCHASE:
            followed += any(
                0 < when - at <= 1800 and products == dimensions["products"]["data"]
                for at, products in carts.get(shopper, [])
            )
    assert followed >= 100


@pytest.mark.parametrize("sim", [{"events": 2000, "malformed_share": 0.2}], indirect=True)
def test_malformed_share_produces_each_malformed_kind(sim):
    response = Journal(sim).get(limit=2000)
    events = [item["event"] for item in response.json()["events"]]
    kinds = Counter()
    for event in events:
        if not isinstance(event, dict):
            kinds["not an object: " + type(event).__name__] += 1
        elif len(json.dumps(event)) > 20_000:
            kinds["oversized"] += 1
        elif "triggerId" not in trigger_of(event):
            kinds["no triggerId"] += 1
        elif isinstance(trigger_of(event)["triggerTimestamp"], str):
            kinds["timestamp not a number"] += 1
            assert trigger_of(event)["triggerTimestamp"] == "yesterday"
    assert set(kinds) == {
        "not an object: str",
        "not an object: list",
        "oversized",
        "no triggerId",
        "timestamp not a number",
    }
    assert 300 < sum(kinds.values()) < 500


@pytest.mark.parametrize("sim", [{"events": 1000, "bare_share": 0.3}], indirect=True)
def test_bare_share_emits_the_bare_trigger_form(sim):
    events = [item["event"] for item in Journal(sim).drain(limit=1000)]
    bare = [e for e in events if "event_id" not in e]
    assert 200 < len(bare) < 400
    assert all(set(e) == {"triggerId", "timeGMT", "mcId", "enrichments"} for e in bare)
    assert all(1e9 < e["timeGMT"] < 1e10 for e in bare)  # seconds
    assert all(dimensions_of(e)["timeGMT"]["data"][-1] < e["timeGMT"] for e in bare)


@pytest.mark.parametrize("sim", [{"events": 2000, "duplicate_share": 0.1}], indirect=True)
def test_duplicates_republish_an_earlier_event_with_the_same_ids(sim):
    items = Journal(sim).drain(limit=1000)
    assert len(items) == 2000
    by_id: dict[str, list[dict]] = {}
    for item in items:
        by_id.setdefault(
            item["event"].get("event_id") or json.dumps(item["event"], sort_keys=True), []
        ).append(item)
    repeated = [copies for copies in by_id.values() if len(copies) > 1]
    assert 120 < sum(len(c) - 1 for c in repeated) < 300
    for copies in repeated:
        assert len({c["position"] for c in copies}) == len(copies)  # a new position each time
        assert all(c["event"] == copies[0]["event"] for c in copies)  # the same event object


def test_rate_publishes_new_events_continuously_at_the_current_time():
    started = time.monotonic()
    with Simulator(SimulatorOptions(rate=400.0)) as sim:
        journal = Journal(sim)
        time.sleep(0.6)
        events = [item["event"] for item in journal.drain()]
        elapsed = time.monotonic() - started
    assert 120 <= len(events) <= 400 * elapsed + 1  # the rate, whatever the machine's load
    assert all(
        abs(trigger_of(e)["triggerTimestamp"] / 1000 - time.time()) < 5
        for e in events
        if isinstance(e, dict) and isinstance(trigger_of(e).get("triggerTimestamp"), int)
    )


@pytest.mark.parametrize(
    "options",
    [
        {"malformed_share": 1.5},
        {"people": 0},
        {"start_time": 5.0},
        {"retention": 0},
        {"public_key_pem": b"not a key"},
    ],
)
def test_impossible_options_are_refused_naming_the_option(options):
    with pytest.raises(ConfigError, match=next(iter(options))):
        Simulator(SimulatorOptions(**options))


def test_publish_raw_appends_exact_objects(sim):
    sim.publish_raw([{"anything": [1, 2]}, "a string", ["a", "list"]])
    tail = Journal(sim).drain(limit=1000)[-3:]
    assert [i["event"] for i in tail] == [{"anything": [1, 2]}, "a string", ["a", "list"]]


def test_the_same_seed_gives_the_same_events_and_another_seed_others():
    def first_page(seed: int) -> list:
        with Simulator(SimulatorOptions(events=50, seed=seed, start_time=1.7e9)) as sim:
            return Journal(sim).get(limit=50).json()["events"]

    assert first_page(3) == first_page(3)
    assert [i["event"]["event_id"] for i in first_page(3)] != [i["event"]["event_id"] for i in first_page(4)]


def test_the_audience_csv_holds_the_people_of_the_events(tmp_path):
    path = write_audience_csv(tmp_path / "audience.csv", 300, opted_out_share=0.1, invalid_email_share=0.1)
    with path.open(encoding="utf-8") as file:
        rows = list(csv.DictReader(file))
    assert list(rows[0]) == [
        "recipient_id",
        "email",
        "first_name",
        "last_name",
        "locale",
        "shopper_id",
        "mc_id",
        "opted_out",
    ]
    assert len(rows) == 300 and len({r["recipient_id"] for r in rows}) == 300
    assert len({r["shopper_id"] for r in rows}) == len({r["mc_id"] for r in rows}) == 300
    assert {r["locale"] for r in rows} == {"fr_FR", "de_DE", "en_US", ""}
    assert 10 < sum(r["opted_out"] == "true" for r in rows) < 60
    assert 10 < sum(not re.fullmatch(r"[^@\s]+@[^@\s]+\.[a-z]+", r["email"]) for r in rows) < 60
    valid = [r["email"] for r in rows if re.fullmatch(r"[^@\s]+@[^@\s]+\.[a-z]+", r["email"])]
    assert all(email.isascii() for email in valid)  # names like Jürgen or Zoé give plain addresses
    by_shopper = {r["shopper_id"]: r["mc_id"] for r in rows}
    assert (rows[7]["shopper_id"], rows[7]["mc_id"]) == person_identity(7)

    with Simulator(SimulatorOptions(events=500, people=300, seed=9)) as sim:
        events = [item["event"] for item in Journal(sim).drain(limit=500)]
    seen = 0
    for event in events:
        dimensions = dimensions_of(event)
        if "eVar01" in dimensions:
            assert by_shopper[dimensions["eVar01"]["data"][0]] == trigger_of(event)["mcId"]
            seen += 1
    assert seen > 400


# --- keys and the command line ----------------------------------------------------------------


def test_create_key_pair_writes_a_private_pkcs8_key_and_refuses_to_overwrite_it(tmp_path):
    private, public = create_key_pair(tmp_path / "k")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    original = private.read_text()
    assert original.startswith("-----BEGIN PRIVATE KEY-----")
    assert public.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    with pytest.raises(CredentialsError, match="--force"):
        create_key_pair(tmp_path / "k")
    assert private.read_text() == original  # untouched
    again, _ = create_key_pair(tmp_path / "k", overwrite=True)
    assert stat.S_IMODE(again.stat().st_mode) == 0o600 and again.read_text() != original


def test_connection_json_is_the_airflow_json_form_of_spec_section_1(tmp_path):
    document = json.loads(
        connection_json(
            "http://127.0.0.1:8765/",
            "cid",
            "secret",
            "O@AdobeOrg",
            "t@techacct.adobe.com",
            tmp_path / "private.pem",
        )
    )
    assert document == {
        "conn_type": "http",
        "host": "http://127.0.0.1:8765",
        "login": "cid",
        "password": "secret",
        "extra": {
            "ims_url": "http://127.0.0.1:8765",
            "org_id": "O@AdobeOrg",
            "technical_account_id": "t@techacct.adobe.com",
            "auth": "jwt",
            "private_key_path": str((tmp_path / "private.pem").resolve()),
            "scopes": ["ent_analytics_bulk_ingest_sdk"],
        },
    }
    oauth_form = json.loads(
        connection_json(
            "https://p", "c", "s", "o", "t", None, auth="oauth", ims_url="https://ims-na1.adobelogin.com"
        )
    )
    assert oauth_form["extra"]["ims_url"] == "https://ims-na1.adobelogin.com"
    assert "private_key_path" not in oauth_form["extra"]
    with pytest.raises(CredentialsError):
        connection_json("https://p", "c", "s", "o", "t", None)


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """The command line in this process (a subprocess would spend seconds importing it again)."""
    from include.cli import main

    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_keys_create_prints_the_connection_for_the_simulator_and_never_the_private_key(tmp_path, capsys):
    code, out, err = run_cli(capsys, "keys", "create", str(tmp_path / "keys"))
    assert code == 0, err
    private = (tmp_path / "keys" / "private.pem").read_text()
    assert private.splitlines()[1] not in out + err
    line = next(li for li in out.splitlines() if li.startswith("AIRFLOW_CONN_ADOBE_PIPELINE="))
    assert (tmp_path / "keys" / "adobe_pipeline.env").read_text().strip() == line
    connection = json.loads(line.split("=", 1)[1].strip("'"))
    assert connection["login"] == "sim-client" and connection["extra"]["auth"] == "jwt"

    # the key pair it wrote authenticates against a simulator that trusts its public half
    public = (tmp_path / "keys" / "public.pem").read_bytes()
    with Simulator(SimulatorOptions(public_key_pem=public)) as sim:
        assert exchange(sim, jwt_for(sim, private.encode())).status_code == 200
    code, _, err = run_cli(capsys, "keys", "create", str(tmp_path / "keys"))
    assert code == 1 and "--force" in err  # no silent overwrite
    assert (tmp_path / "keys" / "private.pem").read_text() == private


def test_simulator_serve_runs_until_interrupted(key_pair):
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "include.cli",
            "simulator",
            "serve",
            "--port",
            "0",
            "--events",
            "40",
            "--public-key",
            str(key_pair[1]),
            "--retention",
            "30",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = re.search(r"http://127\.0\.0\.1:\d+", process.stdout.readline()).group(0)
        stats = requests.get(f"{url}/_sim/stats", timeout=10).json()
        assert stats["journal_length"] == 40 and stats["first_retained"] == 10
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=20) == 0
    finally:
        process.kill()
        process.wait()


def test_simulator_audience_writes_the_csv_and_serve_names_a_bad_key(tmp_path, capsys):
    code, _, err = run_cli(capsys, "simulator", "audience", str(tmp_path / "a.csv"), "--people", "25")
    assert code == 0, err
    assert len((tmp_path / "a.csv").read_text(encoding="utf-8").splitlines()) == 26
    code, _, err = run_cli(
        capsys, "simulator", "serve", "--port", "0", "--public-key", str(tmp_path / "missing.pem")
    )
    assert code == 1 and "keys create" in err
