"""Tooling to try the project without Adobe or a relay: never imported by the product.

``simulator`` (IMS and the journal, with switchable faults), ``smtp_server`` (a local SMTP server
that keeps what it receives), ``keys`` (a key pair and a matching connection), ``demo`` (the
whole job once on embedded defaults). Shipped: docker-compose runs the simulator.
"""
