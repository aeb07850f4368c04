"""Operating the pipeline: what a run did, what the pipeline looks like, what may be deleted.

``report`` records a run's counts and lag (the DAG's report task); ``status`` computes what the
status view and ``cli status`` show; ``purge`` deletes rows past their retention; ``database`` is ``cli db upgrade|check``. May import
every stage below it (database, staging, matching, delivery), never the sandbox.
"""
