"""``python -m benchmarks.multi_edit``."""

from .run import main

main()
