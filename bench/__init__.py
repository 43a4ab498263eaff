"""moeca.bench."""
