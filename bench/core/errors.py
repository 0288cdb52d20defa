"""User-facing errors: the CLI prints them on one line and exits with status 2."""


class BenchError(Exception):
    """Bad input or a condition the user must fix; the message says what and how."""
