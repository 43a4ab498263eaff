"""Entry script of the moeca explorer (``moeca app`` runs ``streamlit run`` on this file).

The root comes from ``$MOECA_APP_ROOT`` (set by ``moeca app --root``); pages live next to this file.
"""
from __future__ import annotations

import streamlit as st

PAGES = (
    ("page_overview.py", "Overview", ":material/home:", "overview"),
    ("page_traces.py", "Traces", ":material/grid_on:", "traces"),
    ("page_token_branch.py", "Token vs branch", ":material/compare_arrows:", "token-vs-branch"),
    ("page_schedule.py", "Schedule", ":material/tune:", "schedule"),
    ("page_replay.py", "Replay", ":material/play_circle:", "replay"),
    ("page_benchmarks.py", "Benchmarks", ":material/leaderboard:", "benchmarks"),
)

st.set_page_config(page_title="moeca explorer", page_icon=":material/hub:", layout="wide")
nav = st.navigation([st.Page(path, title=title, icon=icon, url_path=url, default=(i == 0))
                     for i, (path, title, icon, url) in enumerate(PAGES)])
nav.run()
