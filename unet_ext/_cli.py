"""Command-line plumbing shared by the `unet-ext` subcommands: an argparse parser whose errors
are one line and exit code 2, and UsageError for bad input found later (missing files, wrong
sizes), which main() turns into the same one line and exit code."""
import argparse
import sys

EXIT_USAGE = 2


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit code 2, no traceback."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line (argparse would print the whole usage first)
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        sys.exit(EXIT_USAGE)


def run(prog, function, *args):
    """Calls function(*args); a UsageError (or a missing/unreadable file) becomes one line on
    stderr and exit code 2."""
    try:
        return function(*args)
    except (UsageError, FileNotFoundError, IsADirectoryError, PermissionError) as error:
        # One line even when the message quotes a library's multi-line error.
        message = "; ".join(line.strip() for line in str(error).splitlines() if line.strip())
        sys.stderr.write(f"{prog}: error: {message}\n")
        return EXIT_USAGE
