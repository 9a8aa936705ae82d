"""``python -m eva.cli``: the ``eva`` command line."""
import sys

from . import main

sys.exit(main())
