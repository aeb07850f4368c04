"""Adobe Campaign "Triggers" re-created for Airflow 3: the logic, importable without a scheduler."""
