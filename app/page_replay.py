"""Replay: run the demo model with the chosen schedule; full vs cached grids, PSNR, speedup, accuracy."""
from __future__ import annotations

import threading
from pathlib import Path

import streamlit as st

from moeca.app import common
from moeca.app import replay_run as rr
from moeca.app import results_data as rd
from moeca.app import schedule_view as sv
from moeca.app import uploads
from moeca.app.paths import redact, resolve_under
from moeca.evaluation.evaluator import DigitsClassifier
from moeca.models.registry import SHIPPED_MODELS, load_model

root = common.root()
st.title("Replay")
st.caption("Samples the model the schedule is for (the shipped demo model, or moeca-written weights under the root "
           "that its traces name) twice from the same noise: with full compute and with the schedule (real compute "
           "skipping), then compares them.")


@st.cache_resource(show_spinner="Loading the demo model...")
def demo_model(device: str):
    return load_model("demo", device=device)


@st.cache_resource(max_entries=2, show_spinner="Loading the schedule's model...")
def checkpoint_model(root_str: str, rel: str, key: tuple, device: str):
    """A moeca-written checkpoint under the root (its metadata describes the model), cached by size and mtime."""
    return load_model(None, resolve_under(Path(root_str), rel), device=device)


def model_for(schedule):
    """The demo model, or the moeca-written weights under the root that the schedule's traces name (a custom
    model); raises FileNotFoundError saying what is missing."""
    if schedule.model.fingerprint == SHIPPED_MODELS["demo"].config.fingerprint():
        return demo_model("auto")
    rel = rr.schedule_checkpoint(root, schedule)
    if rel is None:
        raise FileNotFoundError(f"the schedule is for model `{schedule.model.name}`, not the demo model, and none of "
                                "the traces it was derived from (its provenance) names moeca-written weights under "
                                "the root; put the trace and its checkpoint under the root")
    return checkpoint_model(str(root), rel, common.fingerprint(root, (rel,)), "auto")


@st.cache_resource(show_spinner=False)
def model_lock():
    """One replay at a time on the shared model (a runtime is installed on it while sampling)."""
    return threading.Lock()


@st.cache_resource(show_spinner=False)
def classifier():
    try:
        return DigitsClassifier.load_shipped("cpu")
    except (FileNotFoundError, OSError, ValueError):
        return None


found = common.inventory(str(root))
common.show_unreadable(found)


def earlier_replays() -> None:
    """Outputs of `moeca replay --out DIR` under the root: report.json numbers and the two PNG grids."""
    if not found.replays:
        return
    with st.expander(f"Earlier `moeca replay` runs under the root ({len(found.replays)})"):
        rel = st.selectbox("Replay output", found.replays, key="replay_earlier")
        try:
            rep = rd.load_replay(root, rel)
        except (ValueError, OSError) as exc:
            st.warning(f"Cannot read `{rel}`: {exc}")
            return
        cols = st.columns(4)
        for col, (label, key, fmt) in zip(cols, (("measured speedup", "speedup", "{:.2f}x"),
                                                 ("mean PSNR", "psnr_mean", "{:.1f} dB"),
                                                 ("FLOPs computed", "flops_ratio", "{:.1%}"),
                                                 ("accuracy (cached)", "accuracy_cached", "{:.1%}"))):
            value = rep.report.get(key)
            col.metric(label, "n/a" if not isinstance(value, (int, float)) else fmt.format(value))
        g1, g2 = st.columns(2)
        g1.image(rd.read_bytes(root, rep.full_png), caption="full compute")
        g2.image(rd.read_bytes(root, rep.cached_png), caption=f"cached ({rep.report.get('method', '?')})")


sources: dict[str, dict | str] = {}
for key in ("chosen_schedule", "derived_schedule"):
    entry = st.session_state.get(key)
    if isinstance(entry, dict) and entry.get("label") not in sources:
        sources[entry["label"]] = entry
for rel in found.schedules:
    sources[f"file: {rel}"] = rel
if not sources:
    common.show_how_to_produce(root, "schedules", ("trace", "report", "schedule"))
    st.caption("Or derive one on the **Schedule** page; it then appears here.")
    earlier_replays()
    st.stop()

label = st.selectbox("Schedule", list(sources), key="replay_source")
src = sources[label]
try:
    if isinstance(src, dict):
        schedule = src["schedule"]
    else:
        schedule = common.schedule_file(root, src)
except (uploads.UploadError, ValueError, OSError) as exc:
    st.error(f"Schedule {label} is invalid: {exc}")
    st.stop()

nums = sv.summary_numbers(schedule)
st.caption(f"{schedule.method} schedule for model `{schedule.model.name}`, {schedule.sampler.kind} "
           f"{schedule.num_steps} steps; predicted FLOPs ratio "
           f"{'?' if nums['predicted_flops_ratio'] is None else format(nums['predicted_flops_ratio'], '.3f')}")

c1, c2, c3, c4, c5 = st.columns([3, 2, 3, 3, 2])
samples = c1.slider("Samples", 2, 64, 8, key="replay_samples", help="Images per run; labels cycle over the classes")
seed = c2.number_input("Noise seed", 0, 2**31 - 1, 0, key="replay_seed")
cfg_scale = c3.slider("CFG scale", 1.0, 4.0, 1.5, 0.5, key="replay_cfg", disabled=not schedule.sampler.guided)
repeats = c4.slider("Timed repeats (median)", 1, 5, 1, key="replay_repeats")
warmup = c5.checkbox("Warm-up run", value=False, key="replay_warmup",
                     help="One untimed run of each variant before timing (steadier numbers, more time)")

run = st.button("Run replay", type="primary", key="replay_run")
if run:
    settings = rr.ReplaySettings(samples=int(samples), seed=int(seed), cfg_scale=float(cfg_scale),
                                 repeats=int(repeats), warmup=bool(warmup))
    try:
        model = model_for(schedule)
    except (FileNotFoundError, ValueError, OSError) as exc:
        st.warning(f"Cannot run the replay: {redact(root, str(exc))}")
        st.stop()
    bar = st.progress(0.0, text="sampling...")

    def progress(done: int, total: int) -> None:
        bar.progress(min(done / total, 1.0), text=f"sampling: {done}/{total} steps (full and cached)")

    try:
        with model_lock():
            outcome = rr.run_replay(model, schedule, settings, on_step=progress, classifier=classifier())
    except ValueError as exc:  # ScheduleMismatch names the disagreeing field; FloatingPointError for NaN
        bar.empty()
        st.warning(f"This schedule cannot run on its model: {redact(root, str(exc))}")
        st.stop()
    except FloatingPointError as exc:
        bar.empty()
        st.warning(f"The replay stopped: {exc}")
        st.stop()
    bar.empty()
    st.session_state["replay_outcome"] = {"label": label, "settings": settings, "outcome": outcome}

result = st.session_state.get("replay_outcome")
if result is None or result["label"] != label:
    st.info("Press **Run replay** to sample.")
    earlier_replays()
    st.stop()

out: rr.ReplayOutcome = result["outcome"]
m = st.columns(5)
m[0].metric("measured speedup", f"{out.speedup:.2f}x",
            help=f"full {out.full_seconds * 1000:.0f} ms vs cached {out.cached_seconds * 1000:.0f} ms "
                 f"(medians of {result['settings'].repeats}; the speedup is the median of the back-to-back "
                 f"ratios) on {out.device}")
m[1].metric("mean PSNR vs full", f"{float(out.psnr.mean()):.1f} dB")
m[2].metric("FLOPs computed", f"{out.flops_ratio:.1%}")
m[3].metric("accuracy (full)", "n/a" if out.accuracy_full is None else f"{out.accuracy_full:.1%}")
m[4].metric("accuracy (cached)", "n/a" if out.accuracy_cached is None else f"{out.accuracy_cached:.1%}",
            delta=None if out.accuracy_full is None else f"{(out.accuracy_cached - out.accuracy_full) * 100:+.1f} pt")
g1, g2 = st.columns(2)
g1.image(rr.grid(out.full, out.labels), caption="full compute")
g2.image(rr.grid(out.cached, out.labels), caption=f"cached ({schedule.method})")
st.caption("Reused share of rows: " + ", ".join(f"{k} {v:.1%}" for k, v in out.reuse.items())
           + f"; peak cache memory {out.cache_bytes / 2**20:.2f} MiB; labels: "
           + " ".join(str(int(v)) for v in out.labels))
if out.accuracy_full is None:
    st.caption("Accuracy needs the shipped digits classifier, which was not found.")
earlier_replays()
