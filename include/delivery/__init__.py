"""Delivery: sending the pending deliveries over SMTP, each ``delivery_id`` at most once (SPEC 6, 7).

``run.deliver_pending(engine, config, smtp, DeliveryOptions(...))`` is the entry point; ``hook``
reads ``smtp_default`` through the SMTP provider. Inside: ``render`` (templates, MIME),
``render_pool`` (rows to messages, render processes), ``eligibility`` (send-time re-check),
``claims`` (claim, re-check, render), ``smtp`` (the protocol, with pipelining),
``ratelimit`` (shared by all workers), ``scaleout`` (several workers), ``sender`` (a thread per connection), ``recorder`` (group commit), ``recovery``
(interrupted claims), ``state`` (what they share), ``options`` (``DeliveryOptions``). May import config, errors, runtime, database, staging.parser, matching;
never operations or the sandbox.
"""
