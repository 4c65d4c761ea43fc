"""The ``stepdistill`` command line: :mod:`stepdistill.cli.entry` (the entry point), :mod:`stepdistill.cli.parser`
(every subcommand's arguments) and one module per subcommand."""

from stepdistill.cli.entry import main

__all__ = ["main"]
