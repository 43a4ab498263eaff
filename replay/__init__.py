"""moeca.replay."""
