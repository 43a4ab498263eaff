"""moeca.tracer."""
