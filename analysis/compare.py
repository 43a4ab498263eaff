"""The central comparison: reusable MoE FLOPs when reuse is decided per token vs per expert branch.

Estimator (per token ``t`` at step ``s`` and block ``b``, with a cache ``L`` steps old, L = lag):

- Reference norm of the MoE output (routed sum + shared expert, before ``gate_mlp``):
  ``R = sqrt(||moe_s||^2 + ||shared_s||^2)`` from the ``tokens`` table (the two parts are treated as
  orthogonal; the same R is used for both policies, so the comparison does not depend on it).
- Token policy: the whole MoE update (all k routed branches, their old gate weights, and the shared
  expert) is reused as cached at ``s - L``. Its error is bounded by
  ``e_tok = (||moe_s - moe_{s-L}|| + ||shared_s - shared_{s-L}||) / R``, with
  ``||moe_s - moe_{s-L}|| = moe_rel_l2_lagL * ||moe_{s-L}||`` (exact, from the traced metric and the
  norm at ``s - L``). Reused iff ``e_tok`` is within the budget; saves ``k * expert + shared`` FLOPs.
- Branch policy: each routed (token, expert) pair with a cache (routed at ``s - L`` too) is decided on
  its own. The cached *unweighted* output is multiplied by the current gate weight, so its error is
  ``e_br = w_s * ||E(h_s) - E(h_{s-L})|| / R = w_s * rel_l2_lagL * out_norm_{s-L} / R``; it saves
  ``expert`` FLOPs. The shared expert is a unit of its own (``e_sh = ||shared_s - shared_{s-L}|| / R``).
  A pair newly routed at ``s`` has no cache and is always computed.
- The resulting error of a token is the sum of the errors of the units reused for it (triangle
  inequality: an upper bound on the relative error of the MoE output, for both policies alike).
  Because a branch-level token may reuse up to k + 1 units each within the budget, policies are
  compared at equal *resulting mean error*, not at equal budget.

Cache age L = 1 is the step-to-step view; a cache reused for a run of N consecutive steps is L = 1..N
steps old along the run, so the "run of N" curves pool lags 1..N. Fractions are of the MoE FLOPs of
the tokens with ``step >= L`` (``reuse_frac_moe``) and of their whole block FLOPs (attention + router
+ MoE, ``reuse_frac_block``).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from .engine import BUDGETS, Partials

HEADLINE_ERRORS = (0.01, 0.02, 0.05, 0.1)


def sweep(p: Partials) -> pd.DataFrame:
    """Reuse-vs-error curves: one row per (view, span, policy, budget).

    view "lag": cache exactly ``span`` steps old; view "run": pooled over cache ages 1..``span``.
    Columns: view, span, policy ("token" | "branch"), budget, reuse_frac_moe, reuse_frac_block,
    mean_rel_err, tokens.
    """
    K = p.grid.lags
    rows = []
    sums = {name: getattr(p, name).sum(axis=(1, 2)) for name in
            ("fl_tok", "tok_err", "fl_br", "br_err", "fl_sh", "sh_err")}        # [K, NEB]
    moe_total = p.fl_moe_total.sum(axis=(1, 2))                                   # [K]
    block_total = p.fl_block_total.sum(axis=(1, 2))
    n_tok = p.tok_total.sum(axis=(1, 2))
    nb = len(BUDGETS)
    for view in ("lag", "run"):
        for span in range(1, K + 1):
            sl = slice(span - 1, span) if view == "lag" else slice(0, span)
            mt, bt, nt = moe_total[sl].sum(), block_total[sl].sum(), n_tok[sl].sum()
            if nt == 0:
                continue
            curves = {"token": (sums["fl_tok"][sl].sum(0), sums["tok_err"][sl].sum(0)),
                      "branch": (sums["fl_br"][sl].sum(0) + sums["fl_sh"][sl].sum(0),
                                 sums["br_err"][sl].sum(0) + sums["sh_err"][sl].sum(0))}
            for policy, (fl, err) in curves.items():
                cf, ce = np.cumsum(fl)[:nb], np.cumsum(err)[:nb]
                for j, budget in enumerate(BUDGETS):
                    rows.append({"view": view, "span": span, "policy": policy, "budget": float(budget),
                                 "reuse_frac_moe": cf[j] / mt, "reuse_frac_block": cf[j] / bt,
                                 "mean_rel_err": ce[j] / nt, "tokens": int(nt)})
    return pd.DataFrame(rows)


def at_error(curves: pd.DataFrame, view: str, span: int, policy: str, error: float,
             column: str = "reuse_frac_moe") -> float:
    """Reusable fraction at a resulting mean error (linear interpolation along the curve).

    Beyond the curve's largest error the curve's last value is returned (everything reusable within
    budget 1 is reused); below its smallest, the value at budget 0.
    """
    c = curves[(curves.view == view) & (curves.span == span) & (curves.policy == policy)]
    if c.empty:
        return float("nan")
    err = c.mean_rel_err.to_numpy()
    frac = c[column].to_numpy()
    # the curve is non-decreasing in both; keep the best fraction per distinct error
    order = np.lexsort((frac, err))
    err, frac = err[order], np.maximum.accumulate(frac[order])
    return float(np.interp(error, err, frac))


def comparison_table(curves: pd.DataFrame, lags: int, errors=HEADLINE_ERRORS) -> pd.DataFrame:
    """Token vs branch reusable MoE-FLOP fraction at fixed resulting mean errors, per view and span."""
    rows = []
    for view in ("lag", "run"):
        for span in range(1, lags + 1):
            for err in errors:
                tok = at_error(curves, view, span, "token", err)
                br = at_error(curves, view, span, "branch", err)
                rows.append({"view": view, "span": span, "mean_rel_err": err, "token_reuse_frac": tok,
                             "branch_reuse_frac": br, "branch_minus_token": br - tok,
                             "branch_over_token": br / tok if tok > 0 else float("inf") if br > 0 else float("nan"),
                             "token_reuse_frac_block": at_error(curves, view, span, "token", err, "reuse_frac_block"),
                             "branch_reuse_frac_block": at_error(curves, view, span, "branch", err,
                                                                 "reuse_frac_block")})
    return pd.DataFrame(rows)


def auto_error(curves: pd.DataFrame, lags: int, target: float = 0.5) -> float:
    """The mean error at which token-level reuse saves ``target`` of the MoE FLOPs over runs of up to
    ``lags`` steps (the branch curve if the token curve never gets there; 0.05 if neither does).

    Drift scales differ by orders of magnitude between models and samplers, so the headline compares
    the two policies at an operating point taken from the data rather than at a fixed error.
    """
    for policy in ("token", "branch"):
        c = curves[(curves.view == "run") & (curves.span == lags) & (curves.policy == policy)]
        frac, err = c.reuse_frac_moe.to_numpy(), c.mean_rel_err.to_numpy()
        hit = np.flatnonzero(frac >= target)
        if len(hit):
            j = hit[0]
            if j == 0 or frac[j] == frac[j - 1]:
                return float(err[j])
            a = (target - frac[j - 1]) / (frac[j] - frac[j - 1])
            return float(err[j - 1] + a * (err[j] - err[j - 1]))
    return 0.05


def headline(curves: pd.DataFrame, lags: int, error: float | None, label: str) -> dict:
    """The one-sentence answer with its numbers (``{"sentence": str, "numbers": dict}``).

    ``error`` None picks the operating point with :func:`auto_error`.
    """
    auto = error is None
    if auto:
        error = auto_error(curves, lags)
    t1 = at_error(curves, "lag", 1, "token", error)
    b1 = at_error(curves, "lag", 1, "branch", error)
    tk = at_error(curves, "run", lags, "token", error)
    bk = at_error(curves, "run", lags, "branch", error)

    def ratio(b: float, t: float) -> str:
        if t > 0:
            return f"{b / t:.2f}x"
        return "token-level reuses nothing" if b > 0 else "neither reuses anything"

    def verdict(b: float, t: float) -> str:
        if abs(b - t) < 5e-4:
            return "as much as"
        return "more than" if b > t else "less than"

    where = (f" (the error at which token-level reuse saves half of the MoE FLOPs over reuse runs of up to "
             f"{lags} steps)" if auto else "")
    sentence = (f"On {label}, deciding reuse per expert branch instead of per token makes {bk:.1%} instead of "
                f"{tk:.1%} of MoE FLOPs reusable ({ratio(bk, tk)}, {verdict(bk, tk)} token level) over reuse runs "
                f"of up to {lags} steps at the same mean relative MoE-output error of {error:.3g}{where}; with "
                f"1-step-old caches it is {b1:.1%} vs {t1:.1%} ({ratio(b1, t1)}).")
    return {"sentence": sentence,
            "numbers": {"error": error, "error_auto": auto, "lag1_branch_reuse_frac": b1,
                        "lag1_token_reuse_frac": t1, f"run{lags}_branch_reuse_frac": bk,
                        f"run{lags}_token_reuse_frac": tk, "lags": lags,
                        "lag1_branch_over_token": b1 / t1 if t1 > 0 else None,
                        f"run{lags}_branch_over_token": bk / tk if tk > 0 else None}}
