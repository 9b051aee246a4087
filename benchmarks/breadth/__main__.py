"""``python -m benchmarks.breadth``."""

from .driver import main

raise SystemExit(main())
