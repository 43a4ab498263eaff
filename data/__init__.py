"""moeca.data."""
