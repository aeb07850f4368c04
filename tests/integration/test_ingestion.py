"""Authentication, the journal protocol and staging, over real HTTP against the simulator."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from include.adobe.auth import ImsAuthenticator, PipelineCredentials
from include.adobe.journal import JournalClient, JournalDrained, JournalPage
from include.config import load_config, parse_config
from include.database.engine import make_engine
from include.database.schema import events_table, pipeline_state
from include.errors import (
    AuthenticationError,
    JournalGoneError,
    NotEntitledError,
    PipelineRequestError,
    PipelineUnavailableError,
)
from include.sandbox.keys import connection_json, create_key_pair
from include.sandbox.simulator.options import SimulatorOptions
from include.sandbox.simulator.server import Simulator
from include.staging.drain import drain
from tests.conftest import ROOT, upgrade_schema

CART = "3e8a2ba7-fccc-49bb-bdac-33ee33cf02bf"
CONFIG_YAML = f"""
pipeline:
  consumer: customer_dev
  topics:
    - name: triggers
      triggers:
        - {{name: {CART}, label: cart_abandonment}}
        - {{name: 5c2d8e71-4b0a-4f3e-9d6c-1a7b8e9f0c21, label: browse_abandonment}}
        - {{name: 9b1f6a52-0c1e-4d5e-8a0e-5f2d7c3b9e40, label: purchase}}
  fetch_size: 250
  retry_validity: 20s
campaigns:
  - id: cart
    trigger: cart_abandonment
    identity: {{dimension: eVar01, column: shopper_id}}
    where: [{{dimension: pageName, op: startswith, value: checkout}}]
    template: cart_abandonment
    sender: shop@example.com
"""


@pytest.fixture(scope="module")
def key_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return create_key_pair(tmp_path_factory.mktemp("keys"))


@pytest.fixture(autouse=True)
def private_token_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "token-cache"
    monkeypatch.setenv("TRIGGERS_TOKEN_CACHE", str(cache))
    return cache


@pytest.fixture
def engine(engine):
    """conftest's engine, on a database at the code's schema with the dimensions of ``config()``."""
    upgrade_schema(engine, config().dimensions)
    return engine


def start_simulator(key_pair: tuple[Path, Path], **options) -> Simulator:
    simulator = Simulator(SimulatorOptions(public_key_pem=key_pair[1].read_bytes(), seed=7, **options))
    simulator.start()
    return simulator


@pytest.fixture
def simulator(key_pair, request):
    options = getattr(request, "param", {"events": 1000})
    sim = start_simulator(key_pair, **options)
    yield sim
    sim.stop()


def credentials_for(
    sim: Simulator, key_pair: tuple[Path, Path], auth: str = "jwt", **overrides
) -> PipelineCredentials:
    options = sim.options
    fields = dict(
        pipeline_url=sim.url,
        ims_url=sim.url,
        client_id=options.client_id,
        client_secret=options.client_secret,
        org_id=options.org_id,
        technical_account_id=options.technical_account_id,
        auth=auth,
        private_key=key_pair[0].read_bytes() if auth == "jwt" else b"",
    )
    fields.update(overrides)
    return PipelineCredentials(**fields)


def config(**pipeline_overrides):
    loaded = parse_config(CONFIG_YAML)
    if pipeline_overrides:
        loaded = loaded.model_copy(update={"pipeline": loaded.pipeline.model_copy(update=pipeline_overrides)})
    return loaded


def journal(authenticator: ImsAuthenticator) -> JournalClient:
    """The client a drain of ``config()`` reads, as ``AdobePipelineHook(consumer=..., retry_validity=...)``
    makes it from the configuration."""
    pipeline = config().pipeline
    return JournalClient(authenticator, pipeline.consumer, retry_validity=pipeline.retry_validity)


def staged_ids(engine) -> list[str]:
    with engine.connect() as conn:
        return [r[0] for r in conn.execute(select(events_table().c.event_id))]


def stored_position(engine) -> str | None:
    with engine.connect() as conn:
        return conn.execute(select(pipeline_state.c.position)).scalar_one_or_none()


# --- authentication ---------------------------------------------------------------------------


@pytest.mark.parametrize("auth", ["jwt", "oauth"])
def test_token_lifetime_is_read_in_the_unit_of_each_mode(key_pair, auth):
    sim = start_simulator(key_pair, token_lifetime=3600)
    try:
        info = ImsAuthenticator(credentials_for(sim, key_pair, auth)).token_info()
    finally:
        sim.stop()
    # JWT's expires_in is in milliseconds, OAuth's in seconds: both must mean one hour
    assert info["expires_at"] == pytest.approx(time.time() + 3600, abs=30)
    assert "access_token" not in json.dumps(info)


def test_token_is_reused_across_authenticators_until_it_nears_expiry(simulator, key_pair):
    credentials = credentials_for(simulator, key_pair)
    first = ImsAuthenticator(credentials).token()
    second = ImsAuthenticator(credentials).token()  # another task: the private file cache
    assert first == second
    assert simulator.stats["tokens_issued"] == 1


def test_wrong_private_key_fails_with_a_clear_error_and_no_secret(simulator, key_pair, tmp_path, caplog):
    _, _ = other = create_key_pair(tmp_path / "other")
    credentials = credentials_for(simulator, key_pair, private_key=other[0].read_bytes())
    caplog.set_level(logging.DEBUG)
    with pytest.raises(AuthenticationError) as raised:
        ImsAuthenticator(credentials).token()
    message = str(raised.value)
    assert "invalid_signature" in message and "private key" in message
    for secret in (credentials.client_secret, other[0].read_text().splitlines()[1]):
        assert secret not in message and secret not in caplog.text and secret not in repr(credentials)


def test_wrong_client_secret_names_the_fix_without_printing_it(simulator, key_pair, caplog):
    credentials = credentials_for(simulator, key_pair, "oauth", client_secret="not-the-secret-123")
    with pytest.raises(AuthenticationError) as raised:
        ImsAuthenticator(credentials).token()
    assert "invalid_client" in str(raised.value) and "client secret" in str(raised.value)
    assert "not-the-secret-123" not in str(raised.value) + caplog.text


def test_connection_json_round_trips_into_credentials(key_pair):
    document = json.loads(
        connection_json(
            host="http://127.0.0.1:8765",
            client_id="cid",
            client_secret="sec",
            org_id="o@AdobeOrg",
            technical_account_id="t@techacct.adobe.com",
            private_key_path=str(key_pair[0]),
        )
    )

    class Conn:
        host, login, password = document["host"], document["login"], document["password"]
        extra_dejson = document["extra"]

    credentials = PipelineCredentials.from_connection(Conn)
    assert credentials.auth == "jwt" and credentials.private_key == key_pair[0].read_bytes()


# --- the journal table of SPEC section 2 ------------------------------------------------------


def client_for(sim, key_pair, *, retry_validity=20.0, sleeps=None) -> JournalClient:
    return JournalClient(
        ImsAuthenticator(credentials_for(sim, key_pair)),
        "customer_dev",
        retry_validity=retry_validity,
        sleep=(sleeps.append if sleeps is not None else time.sleep),
    )


def test_200_pages_in_order_then_204(simulator, key_pair):
    client = client_for(simulator, key_pair)
    page = client.fetch(None, 400)
    assert isinstance(page, JournalPage)
    body = json.loads(page.body)
    assert body["_page"]["count"] == len(body["events"]) == 400
    assert body["_page"]["last"] == body["events"][-1]["position"]
    positions = [body["_page"]["last"]]
    while isinstance(answer := client.fetch(positions[-1], 400), JournalPage):
        positions.append(json.loads(answer.body)["_page"]["last"])
    assert isinstance(answer, JournalDrained) and len(positions) == 3


@pytest.mark.parametrize("status", [429, 503, 500])
def test_transient_statuses_are_retried_honouring_retry_after(simulator, key_pair, status):
    sleeps: list[float] = []
    simulator.faults.fail_next(status, count=2, retry_after=0.2)
    assert isinstance(client_for(simulator, key_pair, sleeps=sleeps).fetch(None, 10), JournalPage)
    assert len(sleeps) == 2 and min(sleeps) >= 0.2


def test_transient_failures_give_up_after_retry_validity(simulator, key_pair):
    simulator.faults.fail_next(503, count=1000, retry_after=0.05)
    started = time.monotonic()
    with pytest.raises(PipelineUnavailableError, match="retry_validity"):
        client_for(simulator, key_pair, retry_validity=1.0).fetch(None, 10)
    assert time.monotonic() - started < 5


def test_timeouts_and_connection_errors_are_transient(simulator, key_pair):
    client = client_for(simulator, key_pair, retry_validity=3.0)
    client.timeout = (2.0, 0.3)
    simulator.faults.slow_seconds = 1.0
    with pytest.raises(PipelineUnavailableError):
        client.fetch(None, 10)
    assert client.retries >= 1
    simulator.faults.clear()
    dead = client_for(simulator, key_pair, retry_validity=1.0)
    dead.url = "http://127.0.0.1:9/journal/customer_dev"  # nothing listens on the discard port
    with pytest.raises(PipelineUnavailableError, match="ConnectionError"):
        dead.fetch(None, 10)


def test_400_fails_with_a_clear_error(simulator, key_pair):
    with pytest.raises(PipelineRequestError, match="400"):
        client_for(simulator, key_pair).fetch("garbled-position", 10)


def test_403_fails_fast_without_retrying(simulator, key_pair):
    client = JournalClient(ImsAuthenticator(credentials_for(simulator, key_pair)), "someone_else")
    before = (
        sum(simulator.stats.get("journal_requests", {}).values())
        if isinstance(simulator.stats.get("journal_requests"), dict)
        else None
    )
    with pytest.raises(NotEntitledError, match="pipeline.consumer"):
        client.fetch(None, 10)
    assert client.retries == 0
    if before is not None:
        assert sum(simulator.stats["journal_requests"].values()) == before + 1


def test_401_reauthenticates_once_and_retries(simulator, key_pair):
    client = client_for(simulator, key_pair)
    client.fetch(None, 10)
    simulator.expire_tokens()
    assert isinstance(client.fetch(None, 10), JournalPage)
    assert simulator.stats["tokens_issued"] == 2


@pytest.mark.parametrize("simulator", [{"events": 600, "retention": 200}], indirect=True)
def test_410_fails_by_default_and_can_restart_from_oldest(simulator, key_pair, tmp_path, caplog):
    engine = make_engine(f"sqlite:///{tmp_path / 'gone.db'}")
    upgrade_schema(engine, config().dimensions)
    authenticator = ImsAuthenticator(credentials_for(simulator, key_pair))
    first = json.loads(client_for(simulator, key_pair).fetch(None, 1).body)  # oldest retained
    from include.staging.stager import Stager

    stager = Stager(engine, config())
    stager.stage(
        stager.parser.parse_page(json.dumps(first).encode(), time.time()), pipeline_host="h", fetched_at=0
    )
    simulator.publish(400)  # the stored position falls out of retention
    with pytest.raises(JournalGoneError, match="on_gone: restart_from_oldest"):
        drain(engine, config(), journal(authenticator))
    caplog.set_level(logging.ERROR)
    report = drain(engine, config(on_gone="restart_from_oldest"), journal(authenticator))
    assert report.drained and report.received == 200
    assert "lost" in caplog.text


# --- staging ----------------------------------------------------------------------------------


@pytest.mark.parametrize("auth", ["jwt", "oauth"])
@pytest.mark.parametrize(
    "simulator",
    [{"events": 3000, "malformed_share": 0.04, "duplicate_share": 0.05, "bare_share": 0.1}],
    indirect=True,
)
def test_drain_stages_each_event_once_with_quarantine_and_ignored(simulator, key_pair, engine, auth):
    authenticator = ImsAuthenticator(credentials_for(simulator, key_pair, auth))
    report = drain(engine, config(), journal(authenticator))
    assert report.drained and report.received == 3000
    assert report.duplicates > 0 and report.staged == 3000 - report.duplicates
    table = events_table(config().dimensions)
    with engine.connect() as conn:
        by_status = dict(conn.execute(select(table.c.status, func.count()).group_by(table.c.status)).all())
        reasons = {r for (r,) in conn.execute(select(table.c.reason).where(table.c.status == "quarantined"))}
        cart = conn.execute(
            select(table.c.dim_evar01, table.c.dim_pagename, table.c.time_gmt)
            .where(table.c.trigger_id == CART, table.c.status == "new")
            .limit(1)
        ).one()
    assert sum(by_status.values()) == report.staged
    # the report counts messages as received (repeats included); the table holds each once
    assert 0 < by_status["quarantined"] <= report.quarantined and 0 < by_status["ignored"] <= report.ignored
    assert by_status["quarantined"] + by_status["ignored"] + by_status["new"] == report.staged
    assert {"not a JSON object", "no triggerId"} <= reasons
    assert any(r.startswith("larger than max_msg_size") for r in reasons)
    assert any(r.endswith("is not a number") for r in reasons)
    assert cart.dim_evar01.startswith("SHOP-") and cart.dim_pagename.startswith("checkout")
    assert cart.time_gmt > 1e9  # seconds, not milliseconds
    # drained: a second drain stages nothing and keeps the position
    position = stored_position(engine)
    again = drain(engine, config(), journal(authenticator))
    assert again.drained and again.received == 0 and stored_position(engine) == position


def test_a_token_expiring_in_the_middle_of_a_drain_is_renewed(simulator, key_pair, engine):
    authenticator = ImsAuthenticator(credentials_for(simulator, key_pair))
    pages = []

    def expire_after_second_page(response, *args, **kwargs):
        if "/journal/" in response.url and response.status_code == 200:
            pages.append(response.url)
            if len(pages) == 2:
                simulator.expire_tokens()

    authenticator.session.hooks["response"].append(expire_after_second_page)
    report = drain(engine, config(), journal(authenticator))
    assert report.drained and report.staged == 1000
    assert simulator.stats["tokens_issued"] == 2


def test_the_same_page_staged_twice_is_stored_once(simulator, key_pair, engine):
    from include.staging.stager import Stager

    stager = Stager(engine, config())
    body = client_for(simulator, key_pair).fetch(None, 100).body
    first = stager.stage(stager.parser.parse_page(body, time.time()), pipeline_host="h", fetched_at=1.0)
    second = stager.stage(stager.parser.parse_page(body, time.time()), pipeline_host="h", fetched_at=2.0)
    assert (first.staged, second.staged, second.duplicates) == (100, 0, 100)
    assert len(staged_ids(engine)) == 100


def test_a_dimension_added_to_the_configuration_is_filled_for_staged_events(simulator, key_pair, engine):
    authenticator = ImsAuthenticator(credentials_for(simulator, key_pair))
    drain(engine, config(), journal(authenticator))
    wider = parse_config(
        CONFIG_YAML.replace("where: [", "where: [{dimension: products, op: contains, value: SKU}, ")
    )
    table = upgrade_schema(engine, wider.dimensions)  # what `db upgrade` does with the wider configuration
    with engine.connect() as conn:
        filled = conn.execute(select(func.count()).where(table.c.dim_products.is_not(None))).scalar()
    assert filled > 500


# --- a drain killed with SIGKILL loses nothing and duplicates nothing -------------------------


def test_sigkill_in_the_middle_of_a_drain_then_drain_again(key_pair, db_url, tmp_path):
    sim = start_simulator(key_pair, events=20_000, duplicate_share=0.02, malformed_share=0.01)
    try:
        environment = {
            **os.environ,
            "AIRFLOW_CONN_ADOBE_PIPELINE": connection_json(
                host=sim.url,
                client_id=sim.options.client_id,
                client_secret=sim.options.client_secret,
                org_id=sim.options.org_id,
                technical_account_id=sim.options.technical_account_id,
                private_key_path=str(key_pair[0]),
                ims_url=sim.url,
            ),
            "TRIGGERS_DB_URL": db_url,
            "AIRFLOW_HOME": str(tmp_path / "airflow"),
        }
        sim.faults.slow_seconds = 0.1  # long enough a drain to kill it half way
        engine = make_engine(db_url)
        upgrade_schema(engine, load_config().dimensions)  # the command drains with the default configuration
        process = subprocess.Popen(
            [sys.executable, "-m", "include.cli", "drain"],
            cwd=ROOT,
            env=environment,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if len(staged_ids(engine)) >= 5_000:
                    break
            except Exception:  # the table may not exist yet
                pass
            time.sleep(0.05)
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        process.send_signal(signal.SIGKILL)
        process.wait()
        killed_at = len(staged_ids(engine))
        assert 0 < killed_at < 20_000
        sim.faults.clear()
        rerun = subprocess.run(
            [sys.executable, "-m", "include.cli", "drain"],
            cwd=ROOT,
            env=environment,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert rerun.returncode == 0, rerun.stderr[-2000:]
        after_kill = staged_ids(engine)
        engine.dispose()

        reference = make_engine(f"sqlite:///{tmp_path / 'reference.db'}")
        upgrade_schema(reference, config().dimensions)
        drain(reference, config(), journal(ImsAuthenticator(credentials_for(sim, key_pair))))
        expected = staged_ids(reference)
    finally:
        sim.stop()
    assert len(after_kill) == len(set(after_kill))
    assert sorted(after_kill) == sorted(expected)
    assert len(expected) < 20_000  # the journal did repeat some events


@pytest.mark.parametrize(
    "simulator", [{"events": 3000, "duplicate_share": 0.05, "malformed_share": 0.02}], indirect=True
)
def test_pages_that_arrive_during_a_write_join_the_next_transaction_up_to_a_cap(
    simulator, key_pair, engine, tmp_path, monkeypatch
):
    import include.staging.drain as drain_module
    from include.staging.stager import Stager

    transactions = []

    class SlowStager(Stager):
        def stage(self, page, **kwargs):
            transactions.append(page.count)
            time.sleep(0.2)  # a slow database: the next pages arrive meanwhile
            return super().stage(page, **kwargs)

    monkeypatch.setattr(drain_module, "STAGE_BATCH_EVENTS", 250)
    monkeypatch.setattr(drain_module, "STAGE_BATCH_MAX_EVENTS", 1000)
    monkeypatch.setattr(drain_module, "Stager", SlowStager)
    report = drain(engine, config(), journal(ImsAuthenticator(credentials_for(simulator, key_pair))))
    monkeypatch.setattr(drain_module, "Stager", Stager)
    reference = make_engine(f"sqlite:///{tmp_path / 'reference.db'}")
    upgrade_schema(reference, config().dimensions)
    drain(reference, config(fetch_size=3000), journal(ImsAuthenticator(credentials_for(simulator, key_pair))))
    assert report.drained and sum(transactions) == 3000
    assert max(transactions) == 1000 and all(count >= 250 for count in transactions[:-1])
    assert sorted(staged_ids(engine)) == sorted(staged_ids(reference))
    assert stored_position(engine) == stored_position(reference)


@pytest.mark.parametrize("simulator", [{"events": 500}], indirect=True)
def test_start_from_latest_keeps_the_end_position_and_goes_on_from_it(simulator, key_pair, engine):
    authenticator = ImsAuthenticator(credentials_for(simulator, key_pair))
    first = drain(engine, config(start_from="latest"), journal(authenticator))
    assert first.drained and first.received == 0 and stored_position(engine) is not None
    simulator.publish(300)  # published between two drains: not lost
    second = drain(engine, config(start_from="latest"), journal(authenticator))
    assert second.drained and second.received == second.staged == 300
    assert len(staged_ids(engine)) == 300
