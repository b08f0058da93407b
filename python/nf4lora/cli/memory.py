import click


@click.command()
def memory():
    """TODO"""
