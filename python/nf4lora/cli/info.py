"""`nf4lora info`: what this install is and which kernels it runs. The report is the library's own
(nf4lora.info(): version, build, CPU features, the kernel path each op takes, CUDA module and GPU);
this command prints it as text or JSON and adds only the torch and Python versions."""
import json
import platform

import click
import torch


def report():
    import nf4lora
    fn = getattr(nf4lora, "info", None)
    if fn is not None:
        rep = dict(fn())
    else:  # an older nf4lora without the dispatcher report
        from .._native import _C_cuda
        rep = {"version": nf4lora.__version__,
               "paths": "unavailable: this nf4lora has no nf4lora.info()",
               "cuda": {"module_built": _C_cuda is not None, "gpu": torch.cuda.is_available()}}
    rep.setdefault("torch", torch.__version__)
    rep.setdefault("python", platform.python_version())
    return rep


def _lines(obj, indent=0):
    pad = "  " * indent
    for k, v in obj.items():
        if isinstance(v, dict):
            yield f"{pad}{k}:"
            yield from _lines(v, indent + 1)
        elif isinstance(v, (list, tuple)):
            yield f"{pad}{k}: {', '.join(str(x) for x in v) or '-'}"
        else:
            yield f"{pad}{k}: {v}"


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def info(as_json):
    """Version, build, CPU features, the kernel path of each op, CUDA module and GPU."""
    rep = report()
    if as_json:
        click.echo(json.dumps(rep, indent=2, default=str))
    else:
        click.echo("\n".join(_lines(rep)))
