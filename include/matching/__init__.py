"""Matching: staged trigger events -> campaign decisions in ``deliveries`` (SPEC sections 4, 5, 7).

``values`` and ``rules`` (steps 1-3: trigger, where, identity) and ``decisions`` (steps 4-6:
audience, unless, dedupe and the frequency cap) are pure pandas, testable without a database;
``reading`` reads ready events, the frontier, recipients, history and cancelling events;
``writer`` commits decisions with their events' statuses; ``run`` is ``match_ready_events``.
May import: config, runtime, database, audience (the e-mail check), staging's IMPORTED_POSITION;
never delivery or operations.
"""
