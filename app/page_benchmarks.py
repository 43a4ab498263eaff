"""Benchmarks: the Pareto plot and table of ``moeca bench pareto`` (and any other ``moeca bench`` result)."""
from __future__ import annotations

from pathlib import Path

import altair as alt
import pandas as pd
import streamlit as st

from moeca.app import common, results_data as rd

root = common.root()
st.title("Benchmarks")
found = common.inventory(str(root))
common.show_unreadable(found)

if not found.benchmarks:
    common.show_how_to_produce(root, "benchmark results (bench/results/*.json)", ("pareto",))
else:
    options = sorted(found.benchmarks, key=lambda p: (not Path(p).name.startswith("pareto_"), p))  # pareto_<model>.json first
    rel = common.pick("Result", tuple(options), key="bench_result",
                      help="`moeca bench NAME` writes NAME.json, NAME.md and NAME.png")
    try:
        res = rd.load_bench(root, rel)
    except (ValueError, OSError) as exc:
        st.warning(f"Cannot read `{rel}`: {exc}")
        st.stop()
    st.subheader(res.name)
    calibration = res.meta.get("calibration") if isinstance(res.meta.get("calibration"), dict) else {}
    if res.meta.get("synthetic") or calibration.get("synthetic"):
        st.warning("This result is marked synthetic: made-up rows for tests, not measurements. Regenerate it with "
                   "the command below.")
    if res.command:
        st.caption("Regenerate with:")
        st.code(res.command, language="bash")
    frame = rd.flat_rows(res.rows)
    if frame.empty:
        st.info(f"`{rel}` has no rows yet (a sweep still running, or an empty result).")
    else:
        numeric = [c for c in frame.columns if pd.api.types.is_numeric_dtype(frame[c])]
        group = rd.pick_column(frame.columns, "method", "policy", "name")
        if len(numeric) >= 2:
            x_default = rd.pick_column(numeric, "measured_speedup", "speedup", "ratio") or numeric[0]
            y_default = rd.pick_column([c for c in numeric if c != x_default], "psnr", "fd", "accuracy") or \
                next(c for c in numeric if c != x_default)
            c1, c2 = st.columns(2)
            x = c1.selectbox("x axis", numeric, index=numeric.index(x_default), key="bench_x")
            y = c2.selectbox("y axis", numeric, index=numeric.index(y_default), key="bench_y")
            enc = dict(x=alt.X(f"{x}:Q", title=x, scale=alt.Scale(zero=False)),
                       y=alt.Y(f"{y}:Q", title=y, scale=alt.Scale(zero=False)),
                       tooltip=list(frame.columns[:12]))
            if group:
                enc["color"] = alt.Color(f"{group}:N", title=group)
            chart = alt.Chart(frame).mark_line(point=True).encode(**enc) if group else \
                alt.Chart(frame).mark_point().encode(**enc)
            if group:
                chart = chart.encode(order=alt.Order(f"{x}:Q"))
            st.altair_chart(chart, width="stretch", height=360)
        if res.png:
            with st.expander("Figure written by the benchmark", expanded=not len(numeric) >= 2):
                st.image(rd.read_bytes(root, res.png), caption=res.png)
        st.dataframe(frame, hide_index=True)
        ref = res.meta.get("reference")
        if isinstance(ref, dict) and ref:
            st.caption("Full compute (reference): " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else
                                                                f"{k} {v}" for k, v in ref.items()))
        comparison = res.meta.get("comparison")
        if isinstance(comparison, list) and comparison:
            st.markdown("**MoECa against the best baseline** at each speedup (wins / loses only by more than the "
                        "two seed spreads together, else within noise)")
            st.dataframe(rd.flat_rows(tuple(v for v in comparison if isinstance(v, dict))), hide_index=True)
        if res.meta.get("pending"):
            st.info(f"Partial sweep: {len(res.meta['pending'])} points not measured yet "
                    f"(resume with `--resume`).")
        if res.environment:
            st.caption("Measured on: " + ", ".join(f"{k}={v}" for k, v in res.environment.items()))

st.divider()
st.subheader("Inspect a result file")
common.table_upload("Upload a benchmark result (.json) or a table (.parquet)", key="bench_upload")

