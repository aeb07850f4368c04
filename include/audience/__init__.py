"""The audience: the ``recipients`` table (SPEC section 5), loaded by the user.

``load`` upserts recipients from CSV with validation and reasons; ``email_is_valid`` is the one
address check, which matching reuses. May import: database, config, errors.
"""
