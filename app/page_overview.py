"""Overview: what the explorer found under its root, and how to produce what is missing."""
from __future__ import annotations

import streamlit as st

from moeca.app import common

root = common.root()
st.title("moeca explorer")
st.caption(f"Root: `{root}` (only files under it are read)")
found = common.inventory(str(root))
common.show_unreadable(found)

cols = st.columns(4)
for col, (name, items) in zip(cols, (("traces", found.traces), ("analysis reports", found.reports),
                                     ("schedules", found.schedules), ("benchmark results", found.benchmarks))):
    col.metric(name, len(items))

if found.empty:
    common.show_how_to_produce(root, "traces, reports, schedules or benchmark results",
                               ("trace", "report", "schedule", "replay", "pareto"))
else:
    for name, items in (("Traces", found.traces), ("Analysis reports", found.reports),
                        ("Schedules", found.schedules), ("Benchmark results", found.benchmarks)):
        if items:
            st.markdown(f"**{name}**: " + ", ".join(f"`{p}`" for p in items))
    st.markdown("Use the pages on the left: **Traces** (drift heatmaps, routing stability, per-expert "
                "distributions), **Token vs branch** (the analysis' reuse-vs-error curves), **Schedule** (tune "
                "and export a MoECa schedule), **Replay** (run the demo model with it), **Benchmarks** "
                "(MoECa vs baselines).")
    cmds = common.produce_commands(root)
    with st.expander("Commands that produce more data under this root"):
        st.code("\n".join(cmds[k] for k in ("trace", "report", "schedule", "replay", "pareto")), language="bash")
