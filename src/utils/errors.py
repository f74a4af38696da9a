"""The one exception type for mistakes a user can fix; the CLI prints it as one line and exits 2."""


class UserError(Exception):
    """Bad config, missing data or impossible sizes: the message names the key and the fix."""
