"""The Adobe side: IMS authentication (SPEC section 1) and the pipeline journal (section 2).

``auth`` validates the `adobe_pipeline` credentials and hands out cached IMS tokens; ``journal``
is the client of one consumer's journal (every status of the table, retries and backoff);
``hook`` is ``AdobePipelineHook``, whose ``get_conn()`` is that client. May import: errors,
config (and Airflow, in ``hook`` only); never the database or a later stage.
"""
