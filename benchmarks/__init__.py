"""Benchmarks of model-surgery: the concept testbed, efficacy (the paper's tables) and speed."""
