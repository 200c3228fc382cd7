"""The ``relex`` command line: a thin Typer layer over the :mod:`relex` library."""
