"""moeca.models."""
