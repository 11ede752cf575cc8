"""The ``axpo`` command line (:func:`axpo.cli.main.main`), one module per command group."""
