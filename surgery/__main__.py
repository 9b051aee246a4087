"""``python -m surgery`` runs the ``surgery`` command."""

import sys

from .cli import main

sys.exit(main())
