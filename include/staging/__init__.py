"""Staging: journal pages into ``pipeline_events`` with the position, each event once (SPEC 3, 7).

``parser`` turns pages into columns (``limits``: what is storable and accepted; ``salvage``:
the items of a page that is not valid as a whole); ``stager`` writes a page and moves the
position in one transaction; ``drain`` overlaps fetching, parsing and writing until 204 or the per-run cap;
``imports`` stages a JSON-lines export for a backfill; ``dimensions`` adds and fills the
``dim_*`` columns a configuration needs (``db upgrade``). May import: database, adobe, config,
errors, runtime (a command's ``main`` also ``resources``).
"""
