"""Addresses never to email (SPEC section 9): the suppression list, its commands, and the
one-click unsubscribe that feeds it."""
