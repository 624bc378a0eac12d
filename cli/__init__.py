"""The ``kdcache`` command line: a thin Typer layer over the library in ``kdcache``."""
