"""Bounces and complaints (SPEC section 9): which SMTP refusals say an address is bad, the
envelope sender that carries a delivery (VERP), and the delivery status notifications
(RFC 3464), feedback-loop reports (RFC 5965) and ``mailto:`` unsubscribes read from a mailbox.

``codes`` and ``verp`` are pure; ``reports`` parses a message's bytes (no IO); ``apply``
records what a report says in the database; ``mailbox`` reads the mailbox over IMAP
(``imap_default``) and is the ``bounces read`` command.
"""
