"""``python -m include.cli db upgrade|check``: the staging database's schema.

``upgrade`` applies the migrations (``include.database.migrate``), then adds and fills the
``dim_*`` column of each configured dimension (``include.staging.dimensions``): those follow the
configuration, not a revision. Run by docker-compose's init service and the demo; tasks only
check (``include.resources``).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import Engine

from include.database.migrate import check_current, schema_version, upgrade
from include.staging.dimensions import add_dimension_columns


@dataclass(frozen=True)
class DatabaseUpgrade:
    before: str | None  # None: empty, or made before migrations
    revision: str
    added_dimensions: tuple[str, ...]


def upgrade_database(engine: Engine, dimensions: Sequence[str] = ()) -> DatabaseUpgrade:
    """Bring the database to this code's schema and configuration (what ``db upgrade`` does)."""
    version = upgrade(engine)
    added = add_dimension_columns(engine, dimensions)
    return DatabaseUpgrade(version.current, version.head, tuple(added))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    actions.add_parser(
        "upgrade",
        help="apply the schema migrations, then add the configured dimension columns",
        description=upgrade_database.__doc__,
    )
    actions.add_parser(
        "check",
        help="print the schema revision of the database and of the code; exit 1 unless current",
        description="Exit 1, with the command that fixes it, when the database is not at this code's schema.",
    )


def main(args: argparse.Namespace) -> int:
    from include.resources import open_resources

    with open_resources(check=False) as res:
        database = res.engine.url.render_as_string(hide_password=True)
        if args.action == "upgrade":
            done = upgrade_database(res.engine, res.config.dimensions)
            schema = (
                f"{done.before or 'none'} -> {done.revision}"
                if done.before != done.revision
                else f"{done.revision} (current)"
            )
            added = ", ".join(done.added_dimensions) or "none"
            print(f"{database}: schema {schema}; dimension columns added: {added}")
            return 0
        version = schema_version(res.engine)
        print(f"{database}: schema {version.current or 'none'}, this code's {version.head}")
        check_current(res.engine, res.config.dimensions)  # raises, naming the fix, when it is not
    return 0
