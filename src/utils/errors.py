"""The one exception type for mistakes a user can fix; the CLI prints it as one line and exits 2."""


class UserError(Exception):
    """Bad config, missing data or impossible sizes: the message names the key and the fix."""


class RunInterrupted(Exception):
    """A signal stopped training after a checkpoint was saved; the CLI exits with 128 + the signal number."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = int(signum)
