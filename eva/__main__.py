"""``python -m eva``: the ``eva`` command line (also under ``torchrun ... -m eva init ...``)."""
import sys

from .cli import main

sys.exit(main())
