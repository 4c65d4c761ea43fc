"""The one error base the command line needs to know: a failure the user can fix (bad input, a missing or damaged
file, an unavailable metric), reported in one line with exit status 2."""


class InputError(Exception):
    """A failure the user can fix; ``stepdistill`` prints its message in one line and exits with status 2."""
