"""The "Triggers status" view in the Airflow UI: what Campaign's ``/pipelined/status`` answers.

An Airflow 3 plugin with two parts:

* a FastAPI app that the api-server mounts under ``/triggers``: ``/triggers/status`` is an HTML
  page (server-rendered, an inline SVG chart, no external asset: it works offline) and
  ``/triggers/status.json`` the same figures as JSON;
* an external view, ``Triggers status`` in the navigation bar, that shows the page inside the
  Airflow UI (``/plugin/triggers-status``);
* the public one-click unsubscribe endpoint, ``/triggers/unsubscribe/<token>`` (no sign-in: the
  signed token is the authority; :mod:`include.suppressions.endpoint` answers).

Both read ``TRIGGERS_DB_URL`` and ``TRIGGERS_CONFIG`` at request time — importing this file
never touches a database — and both need a signed-in Airflow user (the UI's session cookie or
an API bearer token) whom Airflow's auth manager lets read the ``triggers_pipeline`` DAG's runs
(403 otherwise). Links (the nav entry, each run's DAG run page) carry the path of ``[api]
base_url``, so they work when Airflow is served under a sub-path. Nothing secret is shown: no
connection, key or token is ever read here.
"""

from __future__ import annotations

import os
import threading
import time
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from airflow.plugins_manager import AirflowPlugin
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import HTMLResponse, JSONResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape

URL_PREFIX = "/triggers"
TEMPLATE = "triggers_status.html.j2"
DAG_ID = "triggers_pipeline"  # the DAG whose read permission the view asks for, and whose runs it links
REFRESH_SECONDS = 30
CACHE_SECONDS = 15  # viewers and auto-refreshes within this share one set of queries
CHART_WIDTH, CHART_HEIGHT, CHART_LEFT, CHART_BOTTOM = 760, 200, 48, 24

app = FastAPI(title="Triggers status", docs_url=None, redoc_url=None, openapi_url=None)
_templates = Environment(
    loader=FileSystemLoader(Path(__file__).resolve().parent),
    autoescape=select_autoescape(default=True, default_for_string=True),
)


async def require_signed_in(request: Request) -> Any:
    """The Airflow user behind the request: the UI's cookie or an ``Authorization: Bearer``.

    Airflow's security module is imported here, at request time: this plugin is loaded by
    every Airflow process, and only the api-server ever serves it.
    """
    from airflow.api_fastapi.auth.managers.base_auth_manager import COOKIE_NAME_JWT_TOKEN
    from airflow.api_fastapi.core_api.security import resolve_user_from_token

    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    token = (
        credentials
        if scheme.lower() == "bearer" and credentials
        else request.cookies.get(COOKIE_NAME_JWT_TOKEN)
    )
    return await resolve_user_from_token(token)


async def require_dag_read(user: Annotated[Any, Depends(require_signed_in)]) -> None:
    """A signed-in user whom the auth manager lets read the runs of ``DAG_ID``, else 403."""
    from fastapi.concurrency import run_in_threadpool

    if not await run_in_threadpool(may_read_dag_runs, user):
        raise HTTPException(403, f"your Airflow user may not read the DAG {DAG_ID}")


def may_read_dag_runs(user: Any) -> bool:
    """``is_authorized_dag(GET, RUN, DAG_ID)`` of the configured auth manager (simple, FAB,
    Keycloak...); in multi-team mode with the DAG's team, as Airflow's own routes ask."""
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity, DagDetails
    from airflow.configuration import conf

    team = None
    if conf.getboolean("core", "multi_team", fallback=False):
        from airflow.models.dag import DagModel

        team = DagModel.get_team_name(DAG_ID)
    return get_auth_manager().is_authorized_dag(
        method="GET",
        access_entity=DagAccessEntity.RUN,
        details=DagDetails(id=DAG_ID, team_name=team),
        user=user,
    )


def airflow_base_path() -> str:
    """The path of ``[api] base_url`` ending in ``/`` (``/`` when Airflow is served at the root)."""
    from include.operations.links import configured_base_url

    return urlsplit(configured_base_url()).path.rstrip("/") + "/"


def dag_run_path(run_id: str) -> str:
    """The Airflow 3 UI page of a run of ``DAG_ID`` (the alerts link to the same page)."""
    from include.operations.links import dag_run_link

    return dag_run_link(airflow_base_path(), run_id, DAG_ID)


def _now() -> float:
    return time.time()


# not open_resources(): the api-server lives long, so its engine (and pool) is kept across requests,
# and a database not yet upgraded shows as an error on the page instead of failing the request
@lru_cache(maxsize=4)
def _engine(url: str) -> Any:
    from include.database.engine import make_engine

    return make_engine(url)


_recent: dict[tuple[str, str, int], tuple[float, dict[str, Any]]] = {}
_recent_lock = threading.Lock()


def read_status(days: int) -> dict[str, Any]:
    """The status of the configured consumer, at most ``CACHE_SECONDS`` old, or ``{"error": ...}``.

    Each refresh runs a handful of small queries (per-hour counts, index ranges; no scan of the
    staged events): the short cache only keeps many viewers and auto-refreshes from repeating them.
    """
    key = (os.environ.get("TRIGGERS_DB_URL", ""), os.environ.get("TRIGGERS_CONFIG", ""), days)
    with _recent_lock:
        cached = _recent.get(key)
        if cached and time.monotonic() - cached[0] < CACHE_SECONDS:
            return cached[1]
    status = _read_status(days)
    if "error" not in status:
        with _recent_lock:
            _recent[key] = (time.monotonic(), status)
    return status


def _read_status(days: int) -> dict[str, Any]:
    try:
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import SQLAlchemyError

        from include.config import Settings, load_config
        from include.errors import TriggersError
        from include.operations.status import pipeline_status
    except ImportError as error:
        return {"error": f"cannot import the project ({error}); put the project root on PYTHONPATH"}
    settings = Settings.from_env()
    try:
        config = load_config(settings.config_path, settings.templates_dir)
    except TriggersError as error:
        return {"error": str(error)}
    try:
        return pipeline_status(_engine(settings.db_url), config.pipeline.consumer, now=_now(), days=days)
    except SQLAlchemyError as error:
        where = make_url(settings.db_url).render_as_string(hide_password=True)
        reason = str(getattr(error, "orig", None) or error).splitlines()[0]
        return {"error": f"cannot read the staging database {where} (TRIGGERS_DB_URL): {reason}"}


@app.get("/status.json")
def status_json(days: int = Query(3, ge=1, le=31), _user: None = Depends(require_dag_read)) -> JSONResponse:
    status = read_status(days)
    return JSONResponse(status, status_code=503 if "error" in status else 200)


@app.get("/status", response_class=HTMLResponse)
def status_page(days: int = Query(3, ge=1, le=31), _user: None = Depends(require_dag_read)) -> HTMLResponse:
    return HTMLResponse(render_page(read_status(days), days))


@app.get("/metrics")
def prometheus_metrics(_user: None = Depends(require_dag_read)) -> Response:
    """The last run's counts, lag and send rate in Prometheus' text format (the names:
    include/operations/metrics.py); the same permission as the page (a scraper sends a bearer token)."""
    from sqlalchemy.exc import SQLAlchemyError

    from include.config import Settings
    from include.operations.metrics import PROMETHEUS_CONTENT_TYPE, last_run, prometheus_text

    try:
        body = prometheus_text(last_run(_engine(Settings.from_env().db_url)))
    except SQLAlchemyError:
        return Response("cannot read the staging database (TRIGGERS_DB_URL)\n", status_code=503)
    return Response(body, media_type=PROMETHEUS_CONTENT_TYPE)


@app.api_route("/unsubscribe/{token}", methods=["GET", "HEAD", "POST"], response_class=HTMLResponse)
async def unsubscribe(token: str, request: Request) -> Response:
    """The one-click unsubscribe endpoint (RFC 8058): public, the signed token is the authority.
    Set ``TRIGGERS_UNSUBSCRIBE_URL=https://<api-server>/triggers/unsubscribe/{token}``."""
    from fastapi.concurrency import run_in_threadpool

    body, limit = b"", _UNSUBSCRIBE_MAX_BODY
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            break
    status, page, headers = await run_in_threadpool(
        _answer_unsubscribe, request.method, token, body, request.headers.get("content-type")
    )
    return HTMLResponse(page, status_code=status, headers=headers)


_UNSUBSCRIBE_MAX_BODY = 64 * 1024


def _answer_unsubscribe(
    method: str, token: str, body: bytes, content_type: str | None
) -> tuple[int, str, dict[str, str]]:
    """include.suppressions.endpoint.answer, the handler the standalone server uses too."""
    try:
        from include.config import Settings
        from include.suppressions.endpoint import answer
    except ImportError as error:
        return 503, f"cannot import the project ({error}); put the project root on PYTHONPATH", {}
    result = answer(_engine(Settings.from_env().db_url), method, token, body, content_type)
    return result.status, result.body, result.headers


@app.exception_handler(HTTPException)
async def _refused(request: Request, refused: HTTPException) -> Response:
    """A person gets a page saying to sign in (401) or which permission to ask for (403); an API
    client gets the usual JSON."""
    if request.url.path.endswith("/status"):
        page = _templates.get_template(TEMPLATE).render(
            refused=refused.status_code, detail=refused.detail, base=airflow_base_path(), dag_id=DAG_ID
        )
        return HTMLResponse(page, status_code=refused.status_code, headers=refused.headers)
    return await http_exception_handler(request, refused)


def render_page(status: dict[str, Any], days: int) -> str:
    if "error" in status:
        return _templates.get_template(TEMPLATE).render(error=status["error"], refresh=REFRESH_SECONDS)
    now = status["generated_at"]
    return _templates.get_template(TEMPLATE).render(
        s=status,
        days=days,
        refresh=REFRESH_SECONDS,
        chart=events_chart(status["events_per_hour"]),
        ago=lambda t: None if t is None else format_duration(now - t),
        run_path=dag_run_path,
        dag_id=DAG_ID,
    )


def format_number(value: int | float | None) -> str:
    return "–" if value is None else f"{value:,}"


def format_time(value: float | None) -> str:
    return "never" if value is None else datetime.fromtimestamp(value, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def format_duration(seconds: float | None) -> str:
    """``2.8 s``, ``1 min 30 s``, ``2 h 05 min``, ``3 d 4 h``."""
    if seconds is None:
        return "–"
    if seconds < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes:02d} min"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h"


_templates.filters.update(number=format_number, time=format_time, duration=format_duration)


def events_chart(series: list[dict[str, Any]]) -> dict[str, Any]:
    """Bars, axis ticks and labels of the events-per-hour chart, in SVG user units."""
    plot_width = CHART_WIDTH - CHART_LEFT - 8
    plot_height = CHART_HEIGHT - CHART_BOTTOM - 12
    peak = max((point["events"] for point in series), default=0)
    top = _nice_ceiling(peak)
    slot = plot_width / max(len(series), 1)
    bars, labels = [], []
    for index, point in enumerate(series):
        height = plot_height * point["events"] / top
        hour = datetime.fromtimestamp(point["hour"], UTC)
        x = CHART_LEFT + index * slot
        bars.append(
            {
                "x": round(x + slot * 0.1, 2),
                "y": round(12 + plot_height - height, 2),
                "width": round(slot * 0.8, 2),
                "height": round(height, 2),
                "title": f"{hour:%Y-%m-%d %H}:00 UTC: {point['events']:,} events",
                "events": point["events"],
            }
        )
        if hour.hour == 0 or (index == 0 and hour.hour <= 20):  # a first label clear of the next day's
            labels.append({"x": round(x, 2), "text": f"{hour:%b %d}" if hour.hour == 0 else f"{hour:%H}:00"})
    ticks = [
        {"y": round(12 + plot_height * (1 - fraction), 2), "text": f"{top * fraction:,.0f}"}
        for fraction in (0, 0.5, 1)
    ]
    return {
        "width": CHART_WIDTH,
        "height": CHART_HEIGHT,
        "left": CHART_LEFT,
        "right": CHART_WIDTH - 8,
        "baseline": 12 + plot_height,
        "bars": bars,
        "labels": labels,
        "ticks": ticks,
        "peak": peak,
        "total": sum(point["events"] for point in series),
    }


def _nice_ceiling(value: float) -> float:
    """The smallest 1, 1.5, 2, 3, 4, 5, 6 or 8 x 10^n at or above ``value`` (at least 10): a readable axis top."""
    magnitude = 1.0
    while True:
        for step in (1, 1.5, 2, 3, 4, 5, 6, 8):
            if step * magnitude >= max(value, 10):
                return step * magnitude
        magnitude *= 10


class TriggersStatusPlugin(AirflowPlugin):
    name = "triggers_status"
    fastapi_apps = [{"app": app, "url_prefix": URL_PREFIX, "name": "Triggers status"}]
    external_views = [
        {
            "name": "Triggers status",
            "href": f"{airflow_base_path()}{URL_PREFIX[1:]}/status",  # the iframe's src: under base_url
            "destination": "nav",
            "url_route": "triggers-status",  # shown inside the UI at /plugin/triggers-status
            "nav_top_level": True,
        }
    ]
