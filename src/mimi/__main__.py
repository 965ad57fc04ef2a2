"""``python -m mimi ...`` (and ``torchrun -m mimi ...``): the same command line as ``mimi``."""

import sys

from mimi.cli import main

sys.exit(main())
