"""model-surgery."""
