# The project's Airflow image: the official one plus the pinned requirements (what the official
# docker-compose guide recommends instead of _PIP_ADDITIONAL_REQUIREMENTS).
FROM apache/airflow:3.3.2-python3.11

# dependencies first: this layer is rebuilt only when the pins change
COPY --chown=airflow:0 requirements.txt constraints.txt /opt/airflow/requirements/
RUN pip install --no-cache-dir \
        -r /opt/airflow/requirements/requirements.txt \
        -c /opt/airflow/requirements/constraints.txt

# the project; docker-compose.yaml also mounts dags/, plugins/ and include/ over these for development
COPY --chown=airflow:0 include /opt/airflow/include
COPY --chown=airflow:0 dags /opt/airflow/dags
COPY --chown=airflow:0 plugins /opt/airflow/plugins
# airflow-init's script and the secrets check, which refuses the values of .env.example
COPY --chown=airflow:0 docker /opt/airflow/docker
COPY --chown=airflow:0 .env.example /opt/airflow/.env.example
ENV PYTHONPATH=/opt/airflow
