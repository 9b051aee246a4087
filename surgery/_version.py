"""The package version, in one place (read by the edit files model-surgery writes)."""

__version__ = "0.1.0"
