"""Links into the Airflow UI, shared by the alerts (absolute) and the status view (a path)."""

from __future__ import annotations

from urllib.parse import quote

DAG_ID = "triggers_pipeline"


def dag_run_link(base: str, run_id: str, dag_id: str = DAG_ID) -> str:
    """The Airflow 3 UI page of a run under ``base``: ``[api] base_url`` for a full link, its path
    for one relative to the UI's host (``""`` or ``/``: Airflow served at the root)."""
    return f"{base.rstrip('/')}/dags/{dag_id}/runs/{quote(str(run_id), safe='')}"


def configured_base_url() -> str:
    """``[api] base_url`` ("" when unset or when Airflow's configuration cannot be read)."""
    try:
        from airflow.sdk.configuration import conf

        return conf.get("api", "base_url", fallback="") or ""
    except Exception:  # noqa: BLE001 - a link is a courtesy, never a reason to lose an alert or a page
        return ""
