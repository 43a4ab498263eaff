"""moeca.cli."""
