import click


@click.command()
def info():
    """TODO"""
