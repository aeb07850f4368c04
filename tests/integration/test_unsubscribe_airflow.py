"""The unsubscribe endpoint served by the Airflow api-server's plugin app (``/triggers``), with no
sign-in: GET shows the page and changes nothing, POST one-click records once (a replay too),
forged tokens get a 4xx, while the status view beside it still refuses an anonymous visitor and
shows the suppression counts to a signed-in one."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from sqlalchemy import text

from include.config import load_config
from include.database.engine import make_engine
from include.suppressions.unsubscribe import make_token, unsubscribe_secret
from tests.airflow_harness import AirflowHarness
from tests.conftest import upgrade_schema
from tests.integration.test_unsubscribe import add_delivery

pytestmark = pytest.mark.slow


def http(url: str, data: bytes | None = None, token: str | None = None) -> tuple[int, str]:
    headers = {"Content-Type": "application/x-www-form-urlencoded"} if data is not None else {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data, headers), timeout=20) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_the_plugin_serves_one_click_unsubscribe_without_sign_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TRIGGERS_UNSUBSCRIBE_SECRET", raising=False)
    url = f"sqlite:///{tmp_path / 'triggers.db'}"
    engine = make_engine(url)
    upgrade_schema(engine, load_config().dimensions)
    add_delivery(engine, email="ann@example.com")
    token = make_token(unsubscribe_secret(engine), "d1", "ann@example.com", "cart")
    forged = make_token(b"some-other-secret-0123456789abcdef", "d1", "ann@example.com", "cart")

    def rows() -> list[tuple[str, str]]:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(text("SELECT email, reason FROM suppressions"))]

    with AirflowHarness(tmp_path / "airflow", env={"TRIGGERS_DB_URL": url}) as airflow:
        airflow.cli("db", "migrate")
        airflow.start("api-server")
        try:
            airflow.wait_until_healthy(120)
            link = f"{airflow.base_url}/triggers/unsubscribe/{token}"
            status, page = http(link)
            assert status == 200 and 'value="One-Click"' in page and rows() == []
            assert (
                http(f"{airflow.base_url}/triggers/unsubscribe/{forged}", b"List-Unsubscribe=One-Click")[0]
                == 400
            )
            assert http(link, b"")[0] == 400 and rows() == []
            assert http(link, b"List-Unsubscribe=One-Click")[0] == 200
            assert http(link, b"List-Unsubscribe=One-Click")[0] == 200  # replayed
            assert rows() == [("ann@example.com", "unsubscribed")]
            assert http(f"{airflow.base_url}/triggers/status.json")[0] == 401  # the view still needs sign-in
            status, body = http(f"{airflow.base_url}/triggers/status.json", token=airflow.api_token())
            assert status == 200
            assert json.loads(body)["suppressions"] == {"total": 1, "by_reason": {"unsubscribed": 1}}
            status, page = http(f"{airflow.base_url}/triggers/status", token=airflow.api_token())
            assert status == 200
            table = page[page.index('id="suppressions-by-reason"') :]
            assert re.search(r"<td>unsubscribed</td><td class=\"num\">1</td>", table)
        except BaseException:
            print(airflow.log_tail(5000))
            raise
    engine.dispose()
