"""The staging database: its tables, its schema migrations, its engines and its SQL helpers.

``schema`` holds the tables as the code queries them; ``migrations/`` (Alembic revisions) the
DDL that makes them, applied by ``migrate.upgrade`` and checked by ``migrate.check_current``;
``engine`` makes the engines; ``sql`` is the one copy of each SQL helper and dialect choice.
Lowest stage: may import config and errors only.
"""
