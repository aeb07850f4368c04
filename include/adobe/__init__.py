"""adobe."""
