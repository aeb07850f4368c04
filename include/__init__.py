"""The product: Adobe Campaign's Triggers integration as plain Python that the DAGs call.

One package per stage of an event's path; a package imports only the ones before it::

    errors, config, runtime      foundation: named errors, the YAML configuration, process helpers
    database                     tables, migrations, the one copy of each SQL helper
    resources                    what a task or command starts from: settings, config, engine
    adobe                        IMS authentication, the journal client, AdobePipelineHook
    staging                      page parsing, the staging write, the drain loop, export import
    audience                     the recipients table, loaded from CSV
    suppressions, bounces        addresses never to email; one-click unsubscribe; DSN and ARF reports
    matching                     pure pandas rules, reads, the decision writer, the run
    delivery                     rendering, SMTP with pipelining, rate limits, sending, recovery
    previews                     preview, test send, dry run: what would go out, sending nothing
    operations                   run report, status, purge, the db command
    cli                          the command table

``include/sandbox`` (simulator, local SMTP server, key maker, demo) is tooling for trying the
project; nothing above imports it.
"""
