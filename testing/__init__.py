"""moeca.testing: data made up for tests and benchmarks, never measurements.

- :mod:`.synthetic_traces`: traces with the real schema and known answers (``write_synthetic_trace``);
- :mod:`.explorer_root`: a whole explorer root (synthetic trace, real report, schedule and replay).
"""
