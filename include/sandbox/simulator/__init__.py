"""A local stand-in for Adobe IMS and the Analytics Triggers pipeline journal (SPEC sections 1-3).

``options`` (the settings and their checks), ``ascii_arrays`` (vectorised random words and ASCII
digits), ``population`` (the shoppers and the audience CSV), ``events`` (generated events rendered
as byte matrices), ``journal`` (positions, the journal, its pages), ``handler`` (the HTTP
endpoints), ``server`` (the ``Simulator``: server, faults, tokens), ``cli`` (the ``simulator``
command). Imports only ``include.errors`` from the project; nothing in the product imports it.
"""
