"""``python -m peft_hft`` runs the ``peft-hft`` command line."""

import sys

from .cli.main import main

sys.exit(main())
