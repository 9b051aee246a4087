"""The ``surgery`` command: :func:`surgery.cli.main.main`, one module per command."""
