"""The CLI's error model: every expected failure is a CLIError with a one-line message; main()
prints it as `nf4lora: error: ...` and exits non-zero (never a traceback)."""
import click


class CLIError(click.ClickException):
    """A user-facing failure (bad input, missing file, unwritable output): one line, exit 1."""


def require(*modules, why):
    """Import-check optional dependencies up front: a missing one is a one-line CLIError."""
    import importlib
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            raise CLIError(f"{why} needs the Python package '{name}' (pip install 'nf4lora[demo]')")
