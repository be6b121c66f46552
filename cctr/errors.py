"""User-facing errors: the CLI turns these into one line on stderr and exit code 2."""


class CctrError(Exception):
    """Bad input or state the user can fix; the message is one line that names the culprit."""
