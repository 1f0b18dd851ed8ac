"""Subcommands of the ``peft-hft`` command line (see :mod:`peft_hft.cli`): argument parsing and printing only; the
work is done by the library modules they call."""
