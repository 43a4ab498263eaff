"""moeca.policy."""
