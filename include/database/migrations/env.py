"""Alembic's environment: the migrations run on the connection ``include.database.migrate`` passes
in, inside its transaction (no alembic.ini, no URL here). Offline mode (``--sql``) is not
supported: revision 0001 reads the database to adopt one made before migrations."""

from __future__ import annotations

from alembic import context

from include.database.migrate import VERSION_TABLE
from include.errors import TriggersError

if context.is_offline_mode():
    raise TriggersError("the staging database's migrations run online only: python -m include.cli db upgrade")
context.configure(connection=context.config.attributes["connection"], version_table=VERSION_TABLE)
with context.begin_transaction():
    context.run_migrations()
