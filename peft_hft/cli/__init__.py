"""The ``peft-hft`` command line: :mod:`peft_hft.cli.main` dispatches to one module per subcommand."""
