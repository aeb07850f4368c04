"""The audience: the ``recipients`` table (SPEC section 5), loaded by the user.

``load`` upserts recipients from CSV with validation and reasons; ``email_is_valid`` is the one
address check, which matching reuses. ``source`` reads the audience from a database through an
Airflow connection's SQL hook with the same validation, and syncs it (removals with a guard);
``commands`` is the ``audience`` command line. May import: database, config, errors.
"""
