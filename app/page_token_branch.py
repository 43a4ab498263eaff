"""Token vs branch: the analysis' reuse-vs-error curves (per-token vs per-expert-branch reuse) and headline."""
from __future__ import annotations

from pathlib import Path

import altair as alt
import pandas as pd
import streamlit as st

from moeca.analysis.collect import collect
from moeca.analysis.compare import at_error, headline, sweep
from moeca.app import common
from moeca.app import results_data as rd
from moeca.app.paths import resolve_under

root = common.root()
st.title("Token vs branch")
st.caption("How much MoE compute could be reused at a given error if reuse is decided per whole token versus "
           "per (token, expert) branch: the analysis' central comparison.")
found = common.inventory(str(root))


@st.cache_data(ttl=15, show_spinner=False)
def _report(root_str: str, rel: str, key: tuple) -> rd.Report:
    return rd.load_report(Path(root_str), rel)


@st.cache_data(max_entries=16, show_spinner=False)
def _table(root_str: str, rel: str, key: tuple) -> pd.DataFrame:
    return rd.read_table(Path(root_str), rel)


SWEEP_COLUMNS = {"view", "span", "policy", "mean_rel_err", "reuse_frac_moe"}


def sweep_chart(curves: pd.DataFrame) -> None:
    """The analysis sweep (``analysis.compare.sweep``): reusable fraction vs resulting mean error, token vs branch."""
    c1, c2, c3 = st.columns(3)
    views = {"lag": "cache exactly N steps old", "run": "reuse runs of up to N steps"}
    view = c1.radio("Cache age", [v for v in views if v in set(curves["view"])], key="tvb_view",
                    format_func=views.get)
    spans = sorted(int(v) for v in curves.loc[curves["view"] == view, "span"].unique())
    span = c2.select_slider("N (steps)", spans, value=spans[0], key="tvb_span") if len(spans) > 1 else spans[0]
    ycol = c3.radio("Fraction of", ("MoE FLOPs", "block FLOPs"), key="tvb_of",
                    help="block = attention + router + MoE") if "reuse_frac_block" in curves else "MoE FLOPs"
    y = "reuse_frac_moe" if ycol == "MoE FLOPs" else "reuse_frac_block"
    sel = curves[(curves["view"] == view) & (curves["span"] == span) & (curves["mean_rel_err"] > 0)]
    chart = alt.Chart(sel).mark_line(point=False).encode(
        x=alt.X("mean_rel_err:Q", title="resulting mean relative error of the MoE output",
                scale=alt.Scale(type="log")),
        y=alt.Y(f"{y}:Q", title=f"reusable fraction of {ycol}", axis=alt.Axis(format="%")),
        color=alt.Color("policy:N", title="reuse decided per"),
        tooltip=["policy", alt.Tooltip("budget:Q", format=".3g"), alt.Tooltip("mean_rel_err:Q", format=".3g"),
                 alt.Tooltip(f"{y}:Q", format=".3f")])
    st.altair_chart(chart, width="stretch", height=380)
    rows = []
    for err in (0.01, 0.02, 0.05, 0.1):
        tok = at_error(curves, view, span, "token", err, y)
        br = at_error(curves, view, span, "branch", err, y)
        rows.append({"mean relative error": err, "token-level reusable": tok, "branch-level reusable": br,
                     "branch / token": br / tok if tok > 0 else float("nan")})
    st.dataframe(pd.DataFrame(rows), hide_index=True)


def curve_chart(curves: pd.DataFrame) -> None:
    """The sweep if the table has its columns, else a generic x/y plot of the numeric columns."""
    if SWEEP_COLUMNS <= set(curves.columns):
        sweep_chart(curves)
        return
    numeric = [c for c in curves.columns if pd.api.types.is_numeric_dtype(curves[c])]
    if len(numeric) < 2:
        st.dataframe(curves, hide_index=True)
        return
    x = st.selectbox("x", numeric, key="tvb_x")
    y = st.selectbox("y", [c for c in numeric if c != x], key="tvb_y")
    st.altair_chart(alt.Chart(curves).mark_point().encode(x=f"{x}:Q", y=f"{y}:Q"), width="stretch", height=360)


@st.cache_data(max_entries=4, show_spinner="Running the token-vs-branch comparison on the trace (analysis engine)...")
def _sweep_from_trace(root_str: str, trace_rel: str, key: tuple) -> tuple[pd.DataFrame, dict]:
    col = collect([resolve_under(Path(root_str), trace_rel)], threads=2)
    curves = sweep(col.partials)
    return curves, headline(curves, col.partials.grid.lags, 0.05, f"trace {trace_rel}")


if not found.reports:
    common.show_how_to_produce(root, "analysis reports", ("trace", "report"))
    if found.traces:
        trace_rel = common.pick("...or compare on a trace now (no report written)", found.traces, key="tvb_trace")
        if st.button("Compute the comparison", key="tvb_compute"):
            st.session_state["tvb_computed"] = trace_rel
        if st.session_state.get("tvb_computed") == trace_rel:
            try:
                info = common.trace_info(str(root), trace_rel)
                curves, head = _sweep_from_trace(str(root), trace_rel,
                                                 common.fingerprint(root, info.branch_files + info.token_files))
            except (ValueError, OSError) as exc:
                st.warning(f"Cannot analyse `{trace_rel}`: {exc}")
            else:
                st.success(head["sentence"])
                curve_chart(curves)
else:
    rel = common.pick("Report", found.reports, key="tvb_report", help="A folder written by `moeca analyze`")
    try:
        key = common.fingerprint(root, (rel,))
        report = _report(str(root), rel, key)
    except (ValueError, OSError) as exc:
        st.warning(f"Cannot read report `{rel}`: {exc}")
        st.stop()
    if report.headline and report.headline.get("sentence"):
        st.success(str(report.headline["sentence"]))
        numbers = report.headline.get("numbers")
        if isinstance(numbers, dict) and numbers:
            scalar = {k: v for k, v in numbers.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            cols = st.columns(min(4, max(1, len(scalar))))
            for i, (k, v) in enumerate(list(scalar.items())[:8]):
                cols[i % len(cols)].metric(k.replace("_", " "), f"{v:.4g}" if isinstance(v, float) else str(v))
    else:
        st.info(f"`{rel}` has no headline.json; re-run `moeca analyze` to write it.")

    if report.curves:
        st.subheader("Reuse vs error")
        try:
            curve_chart(_table(str(root), report.curves, common.fingerprint(root, (report.curves,))))
        except (ValueError, OSError) as exc:
            st.warning(f"Cannot read curve table `{report.curves}`: {exc}")
    figures = [f for f in report.figures]
    if figures:
        st.subheader("Figures")
        names = [f.rsplit("/", 1)[-1] for f in figures]
        default = next((i for i, n in enumerate(names) if "token" in n or "branch" in n or "reuse" in n), 0)
        fig = st.selectbox("Figure", names, index=default, key="tvb_figure")
        st.image(rd.read_bytes(root, figures[names.index(fig)]), caption=fig)
    if report.summary:
        st.subheader("Summary table")
        try:
            summary = _table(str(root), report.summary, common.fingerprint(root, (report.summary,)))
        except (ValueError, OSError) as exc:
            st.warning(f"Cannot read `{report.summary}`: {exc}")
        else:
            if "unit" in summary.columns:
                units = sorted(summary["unit"].dropna().astype(str).unique())
                chosen = st.multiselect("Units", units, default=units, key="tvb_units")
                summary = summary[summary["unit"].astype(str).isin(chosen)]
            st.dataframe(summary, hide_index=True)

st.divider()
common.table_upload("Inspect a summary or curve table (.parquet or .json rows)", key="tvb_upload")
