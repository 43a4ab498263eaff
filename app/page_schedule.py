"""Schedule: tune the MoECa knobs, see the reuse map and predicted FLOPs, download or inspect a schedule."""
from __future__ import annotations

import json
from pathlib import Path

import altair as alt
import pandas as pd
import streamlit as st

from moeca.analysis.api import drift_summary
from moeca.app import common
from moeca.app import results_data as rd
from moeca.app import schedule_view as sv
from moeca.app import uploads
from moeca.app.paths import resolve_under
from moeca.policy.schedule import Schedule

root = common.root()
st.title("Schedule")
found = common.inventory(str(root))
common.show_unreadable(found)


@st.cache_data(max_entries=4, show_spinner="Computing the drift summary from the trace (analysis engine)...")
def summary_from_trace(root_str: str, trace_rel: str, key: tuple) -> pd.DataFrame:
    return drift_summary([resolve_under(Path(root_str), trace_rel)], threads=2)


@st.cache_data(max_entries=8, show_spinner=False)
def summary_from_report(root_str: str, report_rel: str, key: tuple) -> pd.DataFrame:
    report = rd.load_report(Path(root_str), report_rel)
    if not report.summary:
        raise ValueError(f"{report_rel} has no summary table")
    return rd.read_table(Path(root_str), report.summary)


@st.cache_data(max_entries=32, show_spinner="Deriving the schedule...")
def derived(summary: pd.DataFrame, run_meta_text: str, knobs: sv.Knobs) -> Schedule:
    schedule = sv.derive(summary, json.loads(run_meta_text), knobs)
    return sv.with_knobs_note(schedule, knobs)


def show_schedule(schedule: Schedule, key: str) -> None:
    """Headline numbers and the reuse map of a schedule."""
    nums = sv.summary_numbers(schedule)
    c = st.columns(5)
    c[0].metric("method", nums["method"])
    c[1].metric("predicted FLOPs ratio", "?" if nums["predicted_flops_ratio"] is None
                else f"{nums['predicted_flops_ratio']:.3f}")
    c[2].metric("predicted speedup", "?" if nums["predicted_speedup"] is None else f"{nums['predicted_speedup']:.2f}x")
    c[3].metric("sync steps", f"{nums['sync_steps']} / {nums['steps']}")
    c[4].metric("mean expert refresh", f"{nums['mean_refresh_expert']:.1%}")
    rmap = sv.reuse_map(schedule)
    unit = st.radio("Reuse map of", ("routed experts", "attention", "shared expert", "MoE (token level)"),
                    horizontal=True, key=f"{key}_unit")
    color = alt.Color("refresh:Q", title="refresh fraction", scale=alt.Scale(domain=[0, 1], scheme="viridis"))
    tooltip = ["step", "block", "expert", alt.Tooltip("refresh:Q", format=".2f"), "sync"]
    if unit == "routed experts":
        data = rmap[rmap["unit"] == "expert"]
        chart = alt.Chart(data).mark_rect().encode(
            x=alt.X("step:O", title="step"), y=alt.Y("expert:O", title="expert"), color=color, tooltip=tooltip,
        ).properties(width=260, height=14 * schedule.model.num_experts).facet(
            facet=alt.Facet("block:O", title="block"), columns=3)
        st.altair_chart(chart, width="content")
    else:
        name = {"attention": "attn", "shared expert": "shared", "MoE (token level)": "moe"}[unit]
        data = rmap[rmap["unit"] == name]
        chart = alt.Chart(data).mark_rect().encode(
            x=alt.X("step:O", title="step"), y=alt.Y("block:O", title="block"), color=color, tooltip=tooltip)
        st.altair_chart(chart, width="stretch", height=80 + 24 * schedule.model.depth)
    st.caption("1 = every token recomputed, 0 = reused whole, in between: share of cached tokens recomputed "
               "(chosen at run time by the online score). Sync steps recompute everything. Newly routed "
               "(token, expert) pairs are always computed and are not part of this map.")


def use_for_replay(schedule: Schedule, label: str, key: str) -> None:
    if st.button("Use this schedule on the Replay page", key=key):
        st.session_state["chosen_schedule"] = {"label": label, "schedule": schedule}
        st.success(f"Replay will use {label}.")


tab_derive, tab_inspect = st.tabs(["Derive from a trace", "Inspect a schedule file"])

with tab_derive:
    if not found.traces:
        common.show_how_to_produce(root, "traces to derive a schedule from", ("trace", "report", "schedule"))
    else:
        trace_rel = common.pick("Trace (model and sampler)", found.traces, key="sched_trace")
        try:
            info = common.trace_info(str(root), trace_rel)
        except (ValueError, OSError) as exc:
            st.warning(f"Cannot read trace `{trace_rel}`: {exc}")
            info = None
        if info is not None:
            sources = [f"report: {r}" for r in found.reports] + ["compute from the trace now"]
            source = st.selectbox("Drift summary", sources, key="sched_source",
                                  help="The analysis summary table the derivation reads "
                                       "(summary.parquet of a report, or computed from the trace)")
            summary = None
            try:
                if source.startswith("report: "):
                    rel = source[len("report: "):]
                    summary = summary_from_report(str(root), rel, common.fingerprint(root, (rel,)))
                else:
                    summary = summary_from_trace(str(root), trace_rel,
                                                 common.fingerprint(root, info.branch_files + info.token_files))
            except (ValueError, OSError) as exc:
                st.warning(f"Cannot load the drift summary: {exc}")
            if summary is not None:
                cfg = (info.meta.get("model") or {}).get("config") or {}
                num_experts = int(cfg.get("num_experts", 0) or 0)
                k1, k2, k3 = st.columns(3)
                mode = k1.radio("Control", ("target speedup", "error budget"), key="sched_mode", horizontal=True)
                if mode == "target speedup":
                    target = k1.slider("Target speedup (predicted FLOPs)", 1.2, 6.0, 3.0, 0.1, key="sched_target")
                    budget = 0.2
                else:
                    target = 3.0
                    budget = k1.select_slider("Error budget (relative L2 staleness)",
                                              [0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0],
                                              value=0.2, key="sched_budget")
                refresh = k2.radio("Refresh rule", ("sync", "budget"), key="sched_refresh", horizontal=True,
                                   help="sync: evenly spaced full refreshes, everything forecast in between; "
                                        "budget: per-expert token budgets between fixed sync steps")
                forecast = k3.radio("Forecast of reused outputs", ("linear", "none"), key="sched_forecast",
                                    horizontal=True)
                sync = k2.slider("Sync refresh interval (budget rule; steps, 0 = none)", 0, 25, 10, key="sched_sync")
                warmup = k2.slider("Warm-up steps computed in full", 1, 10, 1, key="sched_warmup")
                final = k3.slider("Final steps computed in full", 0, 5, 0, key="sched_final")
                staleness = k3.slider("Staleness weight of the online score", 0.0, 0.2, 0.02, 0.01,
                                      key="sched_staleness")
                bias: list[float] = []
                with st.expander("Per-expert bias (multiplies each expert's measured drift: >1 refreshes it "
                                 "more often, <1 less)"):
                    cols = st.columns(min(8, max(num_experts, 1)))
                    for e in range(num_experts):
                        bias.append(cols[e % len(cols)].slider(f"expert {e}", 0.0, 4.0, 1.0, 0.25,
                                                               key=f"sched_bias_{e}"))
                knobs = sv.Knobs(mode=mode, target_speedup=float(target), error_budget=float(budget),
                                 refresh=str(refresh), forecast=str(forecast),
                                 sync_interval=int(sync), warmup_steps=int(warmup), final_steps=int(final),
                                 expert_bias=tuple(float(b) for b in bias), staleness_weight=float(staleness))
                try:
                    schedule = derived(summary, json.dumps(info.meta, sort_keys=True), knobs)
                    doc = schedule.to_json()
                except ValueError as exc:
                    st.warning(f"No schedule for these settings: {exc}")
                else:
                    show_schedule(schedule, "derived")
                    text = json.dumps(doc, indent=1) + "\n"
                    d1, d2 = st.columns(2)
                    d1.download_button("Download schedule JSON", text, file_name="schedule.json",
                                       mime="application/json", key="sched_download")
                    with d2:
                        use_for_replay(schedule, "the schedule derived on the Schedule page", "sched_use_derived")
                    st.session_state["derived_schedule"] = {
                        "label": "the schedule derived on the Schedule page", "schedule": schedule}

with tab_inspect:
    choice = None
    if found.schedules:
        choice = st.selectbox("Schedule under the root", ("(none)",) + found.schedules, key="sched_file")
    up = st.file_uploader("...or upload a schedule (.json); it is validated against the published JSON Schema",
                          type=["json"], key="sched_upload")
    schedule, label = None, None
    if up is not None:
        try:
            schedule = sv.parse_schedule_upload(up.getvalue(), up.name)
            label = f"uploaded {up.name}"
        except uploads.UploadError as exc:
            st.error(f"Schedule rejected: {exc}")
    elif choice and choice != "(none)":
        try:
            schedule = common.schedule_file(root, choice)
            label = choice
        except (uploads.UploadError, ValueError, OSError) as exc:
            st.error(f"Schedule `{choice}` is invalid: {exc}")
    if schedule is not None:
        st.success(f"{label}: valid schedule (format version {schedule.format_version}, method "
                   f"{schedule.method}, model {schedule.model.name}, {schedule.sampler.kind} "
                   f"{schedule.num_steps} steps)")
        show_schedule(schedule, "inspect")
        use_for_replay(schedule, label, "sched_use_file")
    elif up is None and not found.schedules:
        st.caption(f"No schedule files under the root yet: `{common.produce_commands(root)['schedule']}` "
                   "writes one.")
