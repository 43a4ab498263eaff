"""moeca.app: the Streamlit explorer (``moeca app``).

Layout: ``streamlit_app.py`` (entry, navigation) and one ``page_*.py`` script per page; data access in
small modules with one job each: ``paths`` (the root guard), ``inventory`` (discovery), ``trace_data``
(DuckDB/pyarrow aggregation of traces), ``results_data`` (reports, benchmark results), ``uploads``
(JSON/Parquet uploads, never pickle), ``schedule_view`` (derive with the page's knobs, reuse maps),
``replay_run`` (full vs cached sampling), ``common`` (Streamlit caching and messages), ``synthetic``
(synthetic traces and example roots for tests and ``moeca bench app``), ``cli`` (``moeca app``).
"""
