"""moeca.replay: the runtime that follows a schedule, and the driver that measures it.

- :mod:`moeca.replay.runtime` -- ``ReplayRuntime(schedule)`` (``counters``, ``peak_cache_bytes``);
- :mod:`moeca.replay.partial_attention` -- attention for a subset of query tokens;
- :mod:`moeca.replay.driver` -- ``replay_compare(...) -> ReplayResult`` (``.report``: ``ReplayReport``),
  ``write_replay_outputs``, ``sample_batches``, ``activation_bytes_step``;
- :mod:`moeca.replay.cli` -- ``moeca replay``.
"""
