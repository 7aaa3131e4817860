"""``python -m dnmf``: the ``dnmf`` command (see :mod:`dnmf.cli`)."""

import sys

from .cli import main

sys.exit(main())
