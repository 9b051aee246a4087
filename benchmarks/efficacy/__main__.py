"""``python -m benchmarks.efficacy``."""

from .driver import main

main()
