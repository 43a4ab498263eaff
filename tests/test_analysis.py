"""Analysis: known answers on synthetic traces, a naive reference, chunking, Dask, errors, CLI."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from moeca.analysis import drift_summary, load_summary, unit_flops
from moeca.analysis.collect import collect
from moeca.analysis.compare import at_error, sweep
from moeca.analysis.engine import BUDGETS, trace_partials
from moeca.analysis.summary import SUMMARY_COLUMNS, summary_frame
from moeca.testing.synthetic_traces import (EXPERT_DRIFT, GATES, OUT_NORM, TOKEN_DRIFT, routing_table,
                                      write_synthetic_trace)
from moeca.analysis.trace import open_trace, parse_memory_limit
from moeca.models.config import get_preset


def copy_trace(trace: Path, dest: Path) -> Path:
    """A copy of ``trace`` at ``dest`` to damage or edit."""
    import shutil
    shutil.copytree(trace, dest)
    return dest


@pytest.fixture(scope="module")
def known(tmp_path_factory) -> Path:
    """Alternating routing, experts 0 and 2 constant, exact values: 2 samples, CFG, 6 steps, 2 blocks."""
    return write_synthetic_trace(tmp_path_factory.mktemp("known") / "trace", samples=2, samples_per_shard=1)


@pytest.fixture(scope="module")
def noisy(tmp_path_factory) -> Path:
    """Random routing and log-normal drift (no closed form): checked against a naive pandas reference."""
    return write_synthetic_trace(tmp_path_factory.mktemp("noisy") / "trace", samples=3, samples_per_shard=2,
                                 routing="random", noise=0.7, num_steps=7, depth=3, seed=3)


# --------------------------------------------------------------------------------------------- FLOPs

def test_unit_flops_by_hand():
    cfg = get_preset("demo")
    f = unit_flops(cfg.to_dict())
    d, t = 96, 64
    assert f["expert"] == 2 * 3 * d * 4 * d
    assert f["shared"] == 2 * 3 * d * 2 * d
    assert f["attn"] == 2 * 4 * d * d + 2 * 2 * t * d
    assert f["router"] == 2 * d * 8
    assert f["moe_total_per_token"] == 2 * f["expert"] + f["shared"]
    assert f["block_per_token"] == f["attn"] + f["router"] + f["moe_total_per_token"]
    assert unit_flops(cfg) == f
    with pytest.raises(ValueError, match="hidden_size"):
        unit_flops({"depth": 2})


# ------------------------------------------------------------------------------------ known answers

def test_known_answer_expert_and_token_rows(known):
    df = drift_summary([known], threads=1)
    assert list(df.columns) == SUMMARY_COLUMNS
    B, S, E, K, T, N, C = 2, 6, 4, 4, 16, 2, 2
    assert len(df) == 4 * B * S * K + B * S * E * K
    ex = df[df.unit == "expert"].set_index(["block", "step", "expert", "lag"])
    route = routing_table(np.arange(N), S, B, T, E, "alternate")          # [n, S, B, T, 2]
    for b in range(B):
        for s in range(S):
            for e in range(E):
                routed = (route[:, s, b] == e)                              # [n, T, 2]
                n_routed = int(routed.sum()) * C
                gate = (routed[..., 0].sum() * GATES[0] + routed[..., 1].sum() * GATES[1]) * C / n_routed
                for lag in range(1, K + 1):
                    row = ex.loc[(b, s, e, lag)]
                    assert row.mean_gate_weight == pytest.approx(gate, abs=0)
                    if s < lag:
                        assert row.n == 0 and np.isnan(row.persist_frac) and np.isnan(row.mean_rel_l2)
                        continue
                    then = route[:, s - lag, b]                             # [n, T, 2]
                    persist = int((routed & (then == e).any(-1, keepdims=True)).sum()) * C
                    assert row.n == persist
                    assert row.persist_frac == persist / n_routed
                    drift = 0.0 if e in (0, 2) else EXPERT_DRIFT[0] * lag
                    if persist:
                        assert row.mean_rel_l2 == drift and row.p50_rel_l2 == drift and row.p90_rel_l2 == drift
                        assert row.mean_cos == (1.0 if e in (0, 2) else EXPERT_DRIFT[1])
                    assert row.nan_count == 0
    # alternating slot 1: odd lags keep only slot 0, even lags keep both
    lag1 = ex.xs(1, level="lag")
    assert np.nanmean(lag1.persist_frac) == 0.5
    assert np.nanmean(ex.xs(2, level="lag").persist_frac) == 1.0
    tok = df[df.unit != "expert"]
    for unit, (base, cosv) in TOKEN_DRIFT.items():
        u = tok[tok.unit == unit]
        ok = u[u.step >= u.lag]
        assert (ok.n == N * C * T).all()
        assert np.array_equal(ok.mean_rel_l2.to_numpy(), base * ok.lag.to_numpy())
        assert np.array_equal(ok.p50_rel_l2.to_numpy(), base * ok.lag.to_numpy())
        assert (ok.mean_cos == cosv).all()
        assert (u[u.step < u.lag].n == 0).all()
        assert u.expert.eq(-1).all() and u.persist_frac.isna().all() and u.mean_gate_weight.isna().all()


def test_known_answer_token_vs_branch(known):
    col = collect([known], threads=1)
    curves = sweep(col.partials)
    cfg = open_trace(known).config
    f = unit_flops(cfg)
    fe, fs = f["expert"], f["shared"]
    ref = np.sqrt(np.float32(2.0))                                          # ||moe|| = ||shared|| = 1

    def get(span, policy, budget_index, view="lag"):
        c = curves[(curves.view == view) & (curves.span == span) & (curves.policy == policy)]
        return c.iloc[budget_index]

    # lag 1, budget 0: token policy reuses nothing (MoE drifts); branch reuses every shared expert
    # (constant) and the slot-0 branches of constant experts (half the tokens), nothing of slot 1
    # (newly routed every step).
    assert get(1, "token", 0).reuse_frac_moe == 0
    assert get(1, "branch", 0).reuse_frac_moe == pytest.approx((fs + 0.5 * fe) / (2 * fe + fs), abs=1e-15)
    assert get(1, "branch", 0).mean_rel_err == 0
    # just above the drifting branches' error w * 0.125 * out_norm / R (= the token error 0.125 / R)
    e_tok = np.float32(0.125) / (ref + np.float32(1e-12))
    e_br = np.float32(GATES[0]) * np.float32(EXPERT_DRIFT[0]) * np.float32(OUT_NORM) / (ref + np.float32(1e-12))
    j = int(np.searchsorted(BUDGETS, max(e_tok, e_br), side="right"))
    tok, br = get(1, "token", j), get(1, "branch", j)
    assert tok.reuse_frac_moe == 1.0
    assert tok.mean_rel_err == pytest.approx(float(e_tok), rel=1e-6)
    assert br.reuse_frac_moe == pytest.approx((fs + fe) / (2 * fe + fs), abs=1e-15)
    assert br.mean_rel_err == pytest.approx(0.5 * float(e_br), rel=1e-6)
    # interpolation at equal error: token reaches error e_tok linearly from 0
    assert at_error(curves, "lag", 1, "token", float(e_tok) / 2) == pytest.approx(0.5, rel=1e-6)
    # runs of N pool lags 1..N (equal populations weighted by their tokens)
    r2 = get(2, "branch", 0, view="run")
    l1, l2 = get(1, "branch", 0), get(2, "branch", 0)
    assert r2.reuse_frac_moe == pytest.approx((l1.reuse_frac_moe * l1.tokens + l2.reuse_frac_moe * l2.tokens)
                                              / (l1.tokens + l2.tokens), rel=1e-12)


# ---------------------------------------------------------------------------------- naive reference

def _naive_tables(trace: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    b = pd.concat([pd.read_parquet(p) for p in sorted((trace / "branches").glob("*.parquet"))], ignore_index=True)
    t = pd.concat([pd.read_parquet(p) for p in sorted((trace / "tokens").glob("*.parquet"))], ignore_index=True)
    return b, t


def test_matches_naive_reference(noisy):
    df = drift_summary([noisy], threads=1)
    b, t = _naive_tables(noisy)
    ex = df[df.unit == "expert"].set_index(["block", "step", "expert", "lag"])
    for lag in (1, 3):
        rel, cos = b[f"rel_l2_lag{lag}"].astype(np.float64), b[f"cos_lag{lag}"].astype(np.float64)
        g = b.assign(rel=rel, cos=cos).groupby(["block", "step", "expert"])
        ref = pd.DataFrame({"n": g.rel.count(), "size": g.size(), "rel": g.rel.mean(), "cos": g.cos.mean(),
                            "gate": g.gate_weight.mean()})
        got = ex.xs(lag, level="lag").loc[ref.index]
        assert np.array_equal(got.n.to_numpy(), ref.n.to_numpy())
        np.testing.assert_allclose(got.mean_rel_l2, ref.rel, rtol=1e-12)
        np.testing.assert_allclose(got.mean_cos, ref.cos, rtol=1e-12)
        np.testing.assert_allclose(got.mean_gate_weight, ref.gate, rtol=1e-6)
        steps = ref.index.get_level_values("step").to_numpy()
        exp_persist = np.where(steps >= lag, ref.n / ref["size"], np.nan)
        np.testing.assert_allclose(got.persist_frac, exp_persist, rtol=1e-12)
        # quantiles: lower edge of a 1/16-octave bin containing the exact quantile
        q = b.assign(rel=rel).groupby(["block", "step", "expert"]).rel.quantile(0.5, interpolation="lower")
        ok = got.n > 0
        assert (got.p50_rel_l2[ok] <= q.loc[got.index][ok] + 1e-12).all()
        assert (got.p50_rel_l2[ok] >= q.loc[got.index][ok] * (1 - 1 / 16) - 2.5e-4).all()
    for unit in ("attn", "moe", "update"):
        u = df[(df.unit == unit) & (df.lag == 2)].set_index(["block", "step"])
        r = t.assign(rel=t[f"{unit}_rel_l2_lag2"].astype(np.float64)).groupby(["block", "step"]).rel
        np.testing.assert_allclose(u.mean_rel_l2.loc[r.mean().index], r.mean(), rtol=1e-12)
        assert np.array_equal(u.n.loc[r.count().index].to_numpy(), r.count().to_numpy())


def test_comparison_matches_naive_reference(noisy):
    curves = sweep(collect([noisy], threads=1).partials)
    b, t = _naive_tables(noisy)
    f = unit_flops(open_trace(noisy).config)
    keys = ["sample", "cfg_branch", "block", "token"]
    f32 = np.float32
    for lag in (1, 2):
        tt = t[["step", *keys, "moe_norm", "shared_norm", f"moe_rel_l2_lag{lag}", f"shared_rel_l2_lag{lag}"]].copy()
        prev = t[["step", *keys, "moe_norm", "shared_norm"]].assign(step=t.step + lag)
        tt = tt[tt.step >= lag].merge(prev, on=["step", *keys], suffixes=("", "_prev"))
        mn, sn = tt.moe_norm.to_numpy(f32), tt.shared_norm.to_numpy(f32)
        ref = np.sqrt(mn * mn + sn * sn) + f32(1e-12)
        d_sh = tt[f"shared_rel_l2_lag{lag}"].to_numpy(f32) * tt.shared_norm_prev.to_numpy(f32)
        e_tok = (tt[f"moe_rel_l2_lag{lag}"].to_numpy(f32) * tt.moe_norm_prev.to_numpy(f32) + d_sh) / ref
        e_sh = d_sh / ref
        bb = b[b[f"rel_l2_lag{lag}"].notna()][["step", *keys, "expert", "gate_weight", "out_norm",
                                                f"rel_l2_lag{lag}"]]
        bprev = b[["step", *keys, "expert", "out_norm"]].assign(step=b.step + lag)
        bb = bb.merge(bprev, on=["step", *keys, "expert"], suffixes=("", "_prev"))
        bb = bb.merge(tt[["step", *keys]].assign(ref=ref), on=["step", *keys])
        e_br = (bb.gate_weight.to_numpy(f32) * bb[f"rel_l2_lag{lag}"].to_numpy(f32)
                * bb.out_norm_prev.to_numpy(f32) / bb.ref.to_numpy(f32))
        total = len(tt) * f["moe_total_per_token"]
        for j in (0, 40, 70, 90):
            eps = BUDGETS[j]
            use = lambda e: (e < eps) | (e == 0)  # noqa: E731
            c = curves[(curves.view == "lag") & (curves.span == lag)]
            tok = c[(c.policy == "token")].iloc[j]
            br = c[(c.policy == "branch")].iloc[j]
            assert tok.reuse_frac_moe == pytest.approx(use(e_tok).sum() * f["moe_total_per_token"] / total, rel=1e-12)
            assert tok.mean_rel_err == pytest.approx(e_tok[use(e_tok)].sum(dtype=np.float64) / len(tt), rel=1e-6,
                                                     abs=1e-12)
            exp_br = (use(e_br).sum() * f["expert"] + use(e_sh).sum() * f["shared"]) / total
            assert br.reuse_frac_moe == pytest.approx(exp_br, rel=1e-12)
            exp_err = (e_br[use(e_br)].sum(dtype=np.float64) + e_sh[use(e_sh)].sum(dtype=np.float64)) / len(tt)
            assert br.mean_rel_err == pytest.approx(exp_err, rel=1e-6, abs=1e-12)


# ------------------------------------------------------------------------------ out of core, threads, Dask

def test_chunked_and_threaded_reads_agree(noisy):
    whole = trace_partials(noisy, threads=1)
    chunked = trace_partials(noisy, threads=2, chunk_bytes=1)            # one sample per chunk, filtered reads
    assert chunked.branch_rows == whole.branch_rows == open_trace(noisy).branch_rows
    a, b = summary_frame(whole), summary_frame(chunked)
    pd.testing.assert_frame_equal(a[["unit", "block", "step", "expert", "lag", "n", "nan_count"]],
                                  b[["unit", "block", "step", "expert", "lag", "n", "nan_count"]])
    pd.testing.assert_frame_equal(a, b, rtol=1e-12)
    assert np.array_equal(whole.br_cnt, chunked.br_cnt) and np.array_equal(whole.tok_cnt, chunked.tok_cnt)


def test_row_blocks_agree(noisy, monkeypatch):
    """Reducing a chunk in blocks of a few rows gives the counts of one block and the same sums."""
    from moeca.analysis import engine
    whole = trace_partials(noisy, threads=1)
    monkeypatch.setattr(engine, "BLOCK_ROWS", 37)
    blocked = trace_partials(noisy, threads=1)
    for name in ("tu_hist", "ex_hist", "ex_routed", "gw_cnt", "tok_cnt", "br_cnt", "sh_cnt", "tok_total", "fl_br"):
        assert np.array_equal(getattr(whole, name), getattr(blocked, name)), name
    for name in ("tu_sum_rel", "tu_sum_cos", "ex_sum_rel", "ex_sum_gate", "tok_err", "br_err", "sh_err"):
        np.testing.assert_allclose(getattr(whole, name), getattr(blocked, name), rtol=1e-12, err_msg=name)


def test_dask_matches_local(known, noisy, tmp_path):
    distributed = pytest.importorskip("distributed")
    from moeca.analysis.report import analyze
    from moeca.cli.main import main
    local = drift_summary([known, noisy], allow_mixed=True, threads=1)
    analyze([known, noisy], tmp_path / "local", allow_mixed=True, threads=2, make_figures=False)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cl:
        remote = drift_summary([known, noisy], allow_mixed=True, threads=1, scheduler=cl.scheduler_address)
        assert main(["analyze", str(known), str(noisy), "--allow-mixed", "--quiet", "--out", str(tmp_path / "dask"),
                     "--scheduler", cl.scheduler_address, "--no-figures"]) == 0
    pd.testing.assert_frame_equal(local, remote, check_exact=True)
    pd.testing.assert_frame_equal(load_summary(tmp_path / "local"), load_summary(tmp_path / "dask"), check_exact=True)
    a = pd.read_csv(tmp_path / "local" / "comparison.csv")
    b = pd.read_csv(tmp_path / "dask" / "comparison.csv")
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    assert (json.loads((tmp_path / "local" / "headline.json").read_text())["numbers"]
            == json.loads((tmp_path / "dask" / "headline.json").read_text())["numbers"])


def test_memory_limit_parsing():
    assert parse_memory_limit("2GB") == 2 * 1024**3
    assert parse_memory_limit("512MB") == 512 * 1024**2
    assert parse_memory_limit(None) == 2 * 1024**3
    with pytest.raises(ValueError, match="cannot parse"):
        parse_memory_limit("lots")
    with pytest.raises(ValueError, match="below 64MB"):
        parse_memory_limit("1MB")


# --------------------------------------------------------------------------------------------- errors

def test_mixed_traces_refused(known, noisy):
    with pytest.raises(ValueError, match=r"--allow-mixed.*|model\.config"):
        drift_summary([known, noisy])
    try:
        drift_summary([known, noisy])
    except ValueError as exc:
        assert "model.config.depth" in str(exc) or "fingerprint" in str(exc)
        assert "--allow-mixed" in str(exc)
    df = drift_summary([known, noisy], allow_mixed=True, threads=1)
    assert df.block.max() == 2 and df.step.max() == 6                    # union grid


def test_sampler_difference_named(tmp_path, known):
    other = copy_trace(known, tmp_path / "other")
    meta = json.loads((other / "run.json").read_text())
    meta["sampler"]["cfg_scale"] = 3.0
    (other / "run.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"sampler\.cfg_scale: 1\.5 vs 3\.0"):
        drift_summary([known, other])


def test_not_a_trace_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_trace(tmp_path / "nope")
    with pytest.raises(ValueError, match="not a trace directory"):
        open_trace(tmp_path)


def test_unknown_schema_version(tmp_path, known):
    bad = copy_trace(known, tmp_path / "v99")
    meta = json.loads((bad / "run.json").read_text())
    meta["schema_version"] = 99
    (bad / "run.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="unknown trace schema_version 99"):
        open_trace(bad)


def test_truncated_parquet_named(tmp_path, known):
    bad = copy_trace(known, tmp_path / "trunc")
    victim = bad / "branches" / "shard-00001.parquet"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"shard-00001\.parquet: truncated or corrupt"):
        drift_summary([bad])
    # corrupt page data (valid footer): still named
    victim.write_bytes(data[:4] + bytes(len(data) // 3) + data[4 + len(data) // 3:])
    with pytest.raises(ValueError, match=r"shard-00001\.parquet"):
        drift_summary([bad], threads=1)


def test_zero_steps(tmp_path, known):
    bad = copy_trace(known, tmp_path / "zero")
    meta = json.loads((bad / "run.json").read_text())
    meta["sampler"]["num_steps"] = 0
    (bad / "run.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="zero steps"):
        open_trace(bad)
    empty = copy_trace(known, tmp_path / "empty")
    for p in (empty / "branches").glob("*.parquet"):
        p.unlink()
    for p in (empty / "tokens").glob("*.parquet"):
        p.unlink()
    with pytest.raises(ValueError, match="zero steps"):
        open_trace(empty)


def test_incomplete_trace_refused(tmp_path, known):
    bad = copy_trace(known, tmp_path / "partial")
    meta = json.loads((bad / "run.json").read_text())
    meta["num_shards"] = 3
    (bad / "run.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"incomplete \(2 of 3 shards"):
        open_trace(bad)
    (bad / "tokens" / "shard-00001.parquet").unlink()
    meta["num_shards"] = 2
    (bad / "run.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"shard-00001\.parquet.*only one of branches/ and tokens/"):
        open_trace(bad)


def test_branch_rows_without_token_rows(tmp_path, known):
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    bad = copy_trace(known, tmp_path / "missing_tokens")
    path = bad / "tokens" / "shard-00000.parquet"
    table = pq.read_table(path)
    pq.write_table(table.filter(pc.not_equal(table["step"], 3)), path)
    with pytest.raises(ValueError, match=r"tokens.*shard-00000\.parquet|shard-00000\.parquet: \d+ branch rows have no "
                                         r"matching row"):
        drift_summary([bad], threads=1)


def test_nan_metrics_counted_not_dropped(tmp_path, known):
    trace = write_synthetic_trace(tmp_path / "nan", samples=2, nan_rows=5)
    df = drift_summary([trace], threads=1)
    clean = drift_summary([known], threads=1)
    assert df.nan_count.sum() == 5
    assert (df.n.sum() + 5) == clean.n.sum()
    ex1 = df[(df.unit == "expert") & (df.lag == 1)]
    # NaN rows still count as routed-and-persisting pairs (a value exists), only excluded from means
    pd.testing.assert_series_equal(ex1.persist_frac.reset_index(drop=True),
                                   clean[(clean.unit == "expert") & (clean.lag == 1)].persist_frac.reset_index(drop=True))
    from moeca.analysis.report import analyze
    head = analyze([trace], tmp_path / "rep", make_figures=False)
    assert head["numbers"]["nan_metric_values"] == 5
    assert "5 metric values in the trace(s) are NaN" in (tmp_path / "rep" / "report.md").read_text()


# --------------------------------------------------------------------------------------- report and CLI

def test_cli_report(tmp_path, known, capsys):
    from moeca.cli.main import main
    out = tmp_path / "report"
    assert main(["analyze", str(known), "--out", str(out), "--quiet", "--memory-limit", "256MB"]) == 0
    printed = capsys.readouterr().out
    head = json.loads((out / "headline.json").read_text())
    assert head["sentence"] in printed
    md = (out / "report.md").read_text().splitlines()
    assert md[0].startswith("# ") and head["sentence"] in md[2]
    for name in ("drift_heatmaps", "reuse_vs_error", "expert_violins", "routing_stability", "accumulated_drift",
                 "gate_dependence"):
        assert (out / "figures" / f"{name}.png").stat().st_size > 1000
    s = load_summary(out)
    pd.testing.assert_frame_equal(s, drift_summary([known], threads=1), rtol=1e-12)
    csv = pd.read_csv(out / "summary.csv")
    assert list(csv.columns) == SUMMARY_COLUMNS and len(csv) == len(s)
    assert not list(tmp_path.glob(".report.tmp-*"))
    # re-running replaces the previous report; a folder that is not a report is refused
    assert main(["analyze", str(known), "--out", str(out), "--quiet", "--headline-error", "0.05", "--no-figures"]) == 0
    assert not (out / "figures").exists() and "![" not in (out / "report.md").read_text()
    head2 = json.loads((out / "headline.json").read_text())
    assert head2["numbers"]["error"] == 0.05 and head2["numbers"]["error_auto"] is False
    assert head["numbers"]["error_auto"] is True
    assert main(["analyze", str(known), "--out", str(out), "--quiet", "--headline-error", "2"]) == 2
    assert "must be in (0, 1)" in capsys.readouterr().err
    other = tmp_path / "precious"
    other.mkdir()
    (other / "thesis.tex").write_text("x")
    assert main(["analyze", str(known), "--out", str(other), "--quiet"]) == 2
    assert "holds files moeca did not write" in capsys.readouterr().err
    assert [p.name for p in other.iterdir()] == ["thesis.tex"]
    assert main(["analyze", str(tmp_path / "missing"), "--out", str(tmp_path / "r2"), "--quiet"]) == 2
    with pytest.raises(FileNotFoundError, match="summary.parquet"):
        load_summary(tmp_path)


def test_spawned_workers_do_not_rerun_the_callers_script(monkeypatch):
    """The pass's worker processes import moeca only: while they start, ``__main__``'s path is hidden from
    multiprocessing (a caller's script without a ``__main__`` guard would otherwise run again in them)."""
    import sys
    import types

    from moeca.analysis.engine import _main_not_reimported

    fake = types.ModuleType("__main__")
    fake.__file__, fake.__spec__ = "/somewhere/user_script.py", None
    monkeypatch.setitem(sys.modules, "__main__", fake)
    with _main_not_reimported():
        assert not hasattr(sys.modules["__main__"], "__file__")
    assert fake.__file__ == "/somewhere/user_script.py"


def test_figure_worker_failure_is_reported(tmp_path):
    from moeca.analysis.report import _draw_figures

    done = tmp_path / "done"
    _draw_figures([lambda: done.write_text("a"), lambda: (tmp_path / "child").write_text("b")])
    assert done.read_text() == "a" and (tmp_path / "child").read_text() == "b"

    def boom():
        raise ValueError("figure failed")

    with pytest.raises(RuntimeError, match="worker process"):      # the child's half (jobs[1::2]) fails
        _draw_figures([lambda: None, boom])
    with pytest.raises(ValueError, match="figure failed"):          # this process's half fails
        _draw_figures([boom, lambda: None])
