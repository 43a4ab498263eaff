"""moeca.analysis."""
