"""The CLI's error model: every expected failure is a CLIError with a one-line message; main()
prints it as `nf4lora: error: ...` and exits non-zero (never a traceback)."""
import click


class CLIError(click.ClickException):
    """A user-facing failure (bad input, missing file, unwritable output): one line, exit 1."""
