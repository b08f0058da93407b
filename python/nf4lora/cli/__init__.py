"""`nf4lora` (also `python -m nf4lora`): the library's main jobs from one command.

    nf4lora demo     QLoRA fine-tune of a real pretrained model, with metrics, plot and a PEFT adapter
    nf4lora bench    microbenchmarks against their baselines on this device
    nf4lora memory   QLoRA-paper memory tables for a model architecture
    nf4lora info     version, build, CPU features and the kernel path of each op
    nf4lora serve    OpenAI-style HTTP server over an NF4 base and many adapters (batched)

The top layer: it uses nf4lora's public API (and nf4lora.benchmarks) only. Each command lives in its
own module; every expected failure is a one-line `nf4lora: error: ...` and a non-zero exit.
"""
import logging
import os
import sys
import warnings

import click

from .errors import CLIError  # noqa: F401  (re-exported for the command modules)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="nf4lora", prog_name="nf4lora")
def cli():
    """nf4lora: NF4 QLoRA kernels. Run a command with --help for its options."""


def _register():
    from .bench import bench
    from .demo import demo
    from .info import info
    from .memory import memory
    from .serve import serve
    for cmd in (demo, bench, memory, info, serve):
        cli.add_command(cmd)


_register()


def main(argv=None):
    """Entry point of the console script: click's parsing and our errors as one line each."""
    # third-party chatter that is not ours to report (bitsandbytes' optional-kernel notice,
    # transformers' deprecation notices about its own internals)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    try:
        cli.main(args=argv, prog_name="nf4lora", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("nf4lora: interrupted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        ctx = getattr(e, "ctx", None)
        where = f" {ctx.command_path.split(' ', 1)[1]}" if ctx and " " in ctx.command_path else ""
        msg = " ".join(e.format_message().split())
        click.echo(f"nf4lora{where}: error: {msg}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("nf4lora: interrupted", err=True)
        sys.exit(130)
    except Exception as e:  # an unexpected failure: still one line, the traceback on request
        if os.environ.get("NF4LORA_DEBUG"):
            raise
        msg = " ".join(str(e).split()) or type(e).__name__
        click.echo(f"nf4lora: error: {type(e).__name__}: {msg} (NF4LORA_DEBUG=1 shows the traceback)",
                   err=True)
        sys.exit(1)
