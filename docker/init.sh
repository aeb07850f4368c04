#!/usr/bin/env bash
# airflow-init of docker-compose.yaml: refuse example secrets, migrate Airflow's database, create
# and upgrade the staging database, write the admin's password; with the simulator (the default
# pipeline URL), load its shoppers as the audience and unpause the DAGs so emails reach Mailpit.
set -euo pipefail

python /opt/airflow/docker/check_secrets.py
# CeleryExecutor without the celery profile: no broker and no worker, every task would wait forever
if [ "${AIRFLOW__CORE__EXECUTOR}" = CeleryExecutor ] && ! getent hosts redis >/dev/null; then
  echo "airflow-init: AIRFLOW_EXECUTOR=CeleryExecutor needs the celery profile's broker and workers:" \
       "docker compose --profile celery up (or LocalExecutor in .env)" >&2
  exit 1
fi

mkdir -v -p /opt/airflow/{logs,dags,plugins,config}
# the image's entrypoint migrates the metadata database first (_AIRFLOW_DB_MIGRATE)
/entrypoint airflow version

echo "Creating the staging database 'triggers' if missing"
python - <<'PY'
import os
import psycopg
with psycopg.connect(host="postgres", dbname="airflow", user="airflow",
                     password=os.environ["POSTGRES_PASSWORD"], autocommit=True) as conn:
    if not conn.execute("SELECT 1 FROM pg_database WHERE datname = 'triggers'").fetchone():
        conn.execute("CREATE DATABASE triggers OWNER airflow")
PY
echo "Upgrading the staging database's schema (migrations, then the configured dimension columns)"
python -m include.cli db upgrade

echo "Writing the admin's password for the simple auth manager"
python - <<'PY'
import json, os
path = os.environ["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"]
with open(path, "w") as file:
    json.dump({os.environ["_AIRFLOW_WWW_USER_USERNAME"]: os.environ["_AIRFLOW_WWW_USER_PASSWORD"]}, file)
os.chmod(path, 0o600)
PY

if [ "${ADOBE_PIPELINE_URL}" = "http://simulator:8765" ]; then
  # the demo: an audience only into an empty recipients table (a reload would undo opt-outs made
  # since), then the DAGs parsed once here so that they can be unpaused before the scheduler starts
  recipients=$(python - <<'PY'
from sqlalchemy import func, select
from include.config import Settings
from include.database.engine import make_engine
from include.database.schema import recipients
with make_engine(Settings.from_env().db_url).connect() as conn:
    print(conn.execute(select(func.count()).select_from(recipients)).scalar_one())
PY
)
  if [ "$recipients" = "0" ]; then
    echo "Loading the simulator's ${SIMULATOR_PEOPLE} shoppers as the demo audience"
    python -m include.cli simulator audience /tmp/audience.csv --people "${SIMULATOR_PEOPLE}"
    python -m include.cli audience load /tmp/audience.csv
  else
    echo "The recipients table holds ${recipients} recipients: the demo audience is not loaded again"
  fi
  airflow dags reserialize >/dev/null
  airflow dags unpause triggers_pipeline
  airflow dags unpause triggers_purge
else
  echo "ADOBE_PIPELINE_URL is not the simulator: no demo audience, the DAGs stay as they are"
  echo "(unpause triggers_pipeline in the UI once a dry run looks right)"
fi

chown -R "${AIRFLOW_UID:-50000}:0" /opt/airflow/{logs,dags,plugins,config}
