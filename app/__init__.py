"""moeca.app."""
