"""Traces: drift heatmaps over steps x blocks, routing stability, per-expert drift distributions."""
from __future__ import annotations

import altair as alt
import pandas as pd
import streamlit as st

from moeca.app import common, trace_data as td

root = common.root()
st.title("Traces")
found = common.inventory(str(root))
if not found.traces:
    common.show_how_to_produce(root, "traces", ("trace",))
    st.stop()

trace_rel = common.pick("Run", found.traces, key="trace_run", help="A trace folder (run.json + Parquet shards)")
try:
    info = common.trace_info(str(root), trace_rel)
except (td.TraceError, ValueError, FileNotFoundError, OSError) as exc:
    st.warning(f"Cannot read trace `{trace_rel}`: {exc}")
    st.stop()

meta = info.meta
sampler = meta.get("sampler") if isinstance(meta.get("sampler"), dict) else {}
model = meta.get("model") if isinstance(meta.get("model"), dict) else {}
try:
    branch_agg, tok_agg = common.trace_frames(root, info)
except td.TraceError as exc:
    st.warning(str(exc))
    st.stop()
base = branch_agg if not branch_agg.empty else tok_agg

c1, c2, c3, c4, c5 = st.columns(5)
c1.metric("model", str(model.get("name", meta.get("model_name", "?"))))
c2.metric("steps", str(sampler.get("num_steps", int(base["step"].max()) + 1 if not base.empty else "?")))
c3.metric("samples", str(meta.get("num_samples", len(info.labels) if info.labels else "?")))
c4.metric("branch rows", f"{int(branch_agg['rows'].sum()):,}" if not branch_agg.empty else "0")
c5.metric("CFG scale", str(sampler.get("cfg_scale", "?")))
if base.empty:
    st.warning(f"Trace `{trace_rel}` has shard files but no rows yet.")
    st.stop()

# ------------------------------------------------------------------ filters
CFG_NAMES = {0: "cond (0)", 1: "uncond (1)"}
with st.container(border=True):
    f1, f2, f3, f4, f5 = st.columns([3, 3, 3, 2, 2])
    cfg_opts = sorted(int(v) for v in base["cfg_branch"].unique())
    cfg_sel = f1.multiselect("CFG branch", cfg_opts, default=cfg_opts, key="trace_cfg",
                             format_func=lambda v: CFG_NAMES.get(v, str(v)))
    label_opts = sorted(int(v) for v in base["label"].unique())
    has_labels = label_opts != [-1]
    label_sel = f2.multiselect("Class", label_opts, default=label_opts, key="trace_class", disabled=not has_labels,
                               help=None if has_labels else "run.json lists no labels for this trace")
    block_opts = sorted(int(v) for v in base["block"].unique())
    block_sel = f3.multiselect("Blocks", block_opts, default=block_opts, key="trace_blocks")
    lag = f4.slider("Lag (steps since refresh)", 1, max(info.lags, 1), 1, key="trace_lag",
                    disabled=info.lags <= 1,
                    help="Change against the value `lag` steps back: what a cache reused that long has drifted")
    metric = f5.radio("Metric", ("relative L2", "cosine"), key="trace_metric", horizontal=True)
if not cfg_sel or not label_sel or not block_sel:
    st.warning("Select at least one CFG branch, class and block.")
    st.stop()

b = td.apply_filters(branch_agg, cfg_sel, label_sel, block_sel)
t = td.apply_filters(tok_agg, cfg_sel, label_sel, block_sel)
mkey = f"rel{lag}" if metric == "relative L2" else f"cos{lag}"
value_title = f"mean {metric} (lag {lag})"

# ------------------------------------------------------------------ heatmaps
st.subheader("Drift over steps x blocks")
units = [f"{name}" for name in td.UNIT_LABELS.values()] if not t.empty else []
units += ["routed experts (all branches)", "each routed expert"] if not b.empty else []
u1, u2 = st.columns([3, 1])
unit = u1.selectbox("Unit", units, key="trace_unit")
log_scale = u2.checkbox("log colour scale", value=metric == "relative L2", key="trace_log",
                        disabled=metric != "relative L2")


def heat(frame: pd.DataFrame, title: str, facet: str | None = None) -> alt.Chart:
    scale = alt.Scale(type="log", scheme="viridis") if log_scale and metric == "relative L2" else \
        alt.Scale(scheme="viridis", reverse=metric == "cosine")
    frame = frame.dropna(subset=["value"])
    if log_scale and metric == "relative L2":
        frame = frame[frame["value"] > 0]
    chart = alt.Chart(frame).mark_rect().encode(
        x=alt.X("step:O", title="sampling step (0 = noisiest)"), y=alt.Y("block:O", title="block"),
        color=alt.Color("value:Q", title=value_title, scale=scale),
        tooltip=["step", "block", alt.Tooltip("value:Q", format=".4g"), "n", "nan"])
    if facet:
        return chart.properties(width=220, height=110).facet(facet=alt.Facet(f"{facet}:O", title=title), columns=4)
    return chart.properties(title=title)


heat_height = 90 + 22 * len(block_sel)
unit_keys = {v: k for k, v in td.UNIT_LABELS.items()}
if unit in unit_keys:
    grid = td.drift_grid(t, f"{unit_keys[unit]}_{mkey}")
    st.altair_chart(heat(grid, f"{unit}: {value_title}"), width="stretch", height=heat_height)
elif unit == "routed experts (all branches)":
    grid = td.drift_grid(b, mkey)
    st.altair_chart(heat(grid, f"routed expert branches: {value_title}"), width="stretch", height=heat_height)
else:
    grid = td.drift_grid(b, mkey, by=("expert", "step", "block"))
    st.altair_chart(heat(grid, "expert"), width="content")
nan_total = int(grid["nan"].sum()) if not grid.empty else 0
finite_total = int(grid["n"].sum()) if not grid.empty else 0
st.caption(f"{finite_total:,} finite values averaged" + (f"; **{nan_total:,} NaN/Inf values excluded**"
                                                          if nan_total else "; no NaN/Inf values"))

# ------------------------------------------------------------------ routing stability
if not b.empty:
    st.subheader("Routing stability")
    st.caption("Fraction of routed (token, expert) pairs that were also routed at the previous step: a newly "
               "routed pair has no cache entry and must be computed.")
    stab = td.routing_stability(b)
    if stab.empty:
        st.info("Only one step in this selection: routing stability needs two.")
    else:
        mean_all = stab["persist_frac"].mul(stab["rows"]).sum() / max(stab["rows"].sum(), 1)
        st.metric("mean persistence (all selected steps and blocks)", f"{mean_all:.1%}")
        chart = alt.Chart(stab).mark_line(point=False).encode(
            x=alt.X("step:Q", title="sampling step"), y=alt.Y("persist_frac:Q", title="pairs persisting",
                                                               scale=alt.Scale(domain=[0, 1])),
            color=alt.Color("block:N", title="block"), tooltip=["step", "block",
                                                                alt.Tooltip("persist_frac:Q", format=".3f")])
        st.altair_chart(chart, width="stretch", height=260)

    # -------------------------------------------------------------- per-expert distributions
    st.subheader("Per-expert drift distributions")
    try:
        hist = td.apply_filters(common.trace_histogram(root, info, lag), cfg_sel, label_sel, block_sel)
    except td.TraceError as exc:
        st.warning(str(exc))
        st.stop()
    quant = td.histogram_quantiles(hist)
    if quant.empty:
        st.info(f"No finite relative-L2 values at lag {lag} in this selection.")
    else:
        st.caption(f"Relative L2 change of each expert's unweighted output vs {lag} step(s) back (log scale): "
                   "whiskers 5-95 %, box 25-75 %, tick = median. Experts with wider boxes need more refreshes.")
        y = alt.Y("q05:Q", scale=alt.Scale(type="log"), title=f"relative L2 (lag {lag})")
        base_chart = alt.Chart(quant).encode(x=alt.X("expert:O", title="expert"))
        chart = (base_chart.mark_rule().encode(y=y, y2="q95:Q")
                 + base_chart.mark_bar(size=18, opacity=0.7).encode(y="q25:Q", y2="q75:Q")
                 + base_chart.mark_tick(color="black", size=18).encode(y="q50:Q",
                                                                     tooltip=["expert", "q05", "q25", "q50",
                                                                              "q75", "q95", "count"]))
        st.altair_chart(chart, width="stretch", height=280)
        with st.expander("Quantile table"):
            st.dataframe(quant, hide_index=True)
