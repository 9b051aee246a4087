"""``python -m surgery`` runs the ``surgery`` command."""

import sys

from surgery.cli.main import main

sys.exit(main())
