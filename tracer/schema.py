"""The trace format: one source of truth for the tracer (writer), analysis and app (readers).

A trace is a directory::

    TRACE_DIR/
      run.json                      # RunMeta: model, sampler, seeds, labels, versions, schema version
      branches/shard-00000.parquet  # one file per sample shard (a batch of samples traced together)
      tokens/shard-00000.parquet
      vectors/shard-00000.parquet   # only with --dump-vectors N

Metric conventions (all computed on the device where the model runs):
- ``rel_l2_lag{L}`` = ||v_s - v_{s-L}|| / (||v_{s-L}|| + 1e-12) and ``cos_lag{L}`` = cosine(v_s, v_{s-L}),
  where ``v_s`` is the unit's output at step ``s`` for the same sample, CFG branch, block and token
  (and, in ``branches``, the same expert). ``lag1`` is DESIGN's ``*_prev``.
- In ``branches`` a lag metric is null when that (token, expert) pair was not routed at step ``s - L``
  (no value to compare against) and at steps ``s < L``. In ``tokens`` they are null for ``s < L``.
- Expert outputs are *unweighted* (before the gate weight); ``out_norm`` is ||E_e(h_t)||.
- ``cfg_branch`` is 0 for the conditional (or unguided) pass and 1 for the unconditional pass.
"""
from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = 1
DEFAULT_LAGS = 4
TABLES = ("branches", "tokens", "vectors")
TOKEN_UNITS = ("attn", "moe", "shared", "update")
"""Token-level units: attention output, routed MoE sum (gate-weighted), shared expert, block update
(``gate_msa * attn + gate_mlp * (moe + shared)``)."""

_KEY_FIELDS = [
    pa.field("run", pa.dictionary(pa.int8(), pa.string()), nullable=False),
    pa.field("sample", pa.int32(), nullable=False),     # global sample index within the run
    pa.field("cfg_branch", pa.int8(), nullable=False),  # 0 cond/unguided, 1 uncond
    pa.field("step", pa.int16(), nullable=False),       # 0 = first (noisiest) sampling step
    pa.field("t", pa.float32(), nullable=False),        # model time fed at this step
    pa.field("block", pa.int16(), nullable=False),
    pa.field("token", pa.int16(), nullable=False),
]


def lag_fields(prefix: str, lags: int) -> list[pa.Field]:
    out = []
    for lag in range(1, lags + 1):
        out.append(pa.field(f"{prefix}rel_l2_lag{lag}", pa.float16()))
        out.append(pa.field(f"{prefix}cos_lag{lag}", pa.float16()))
    return out


def branch_schema(lags: int = DEFAULT_LAGS) -> pa.Schema:
    """One row per (run, sample, cfg_branch, step, block, token, slot)."""
    return pa.schema(_KEY_FIELDS + [
        pa.field("slot", pa.int8(), nullable=False),         # 0..k-1, ordered by gate weight (descending)
        pa.field("expert", pa.int16(), nullable=False),
        pa.field("gate_weight", pa.float32(), nullable=False),  # raw softmax probability
        pa.field("out_norm", pa.float16(), nullable=False),     # ||E_e(h)||, unweighted
        pa.field("routed_prev", pa.bool_(), nullable=False),    # pair routed at step - 1
        pa.field("in_rel_l2_prev", pa.float16()),               # drift of the expert's input h vs step - 1
    ] + lag_fields("", lags), metadata={b"moeca_schema_version": str(SCHEMA_VERSION).encode(),
                                         b"moeca_table": b"branches"})


def token_schema(lags: int = DEFAULT_LAGS) -> pa.Schema:
    """One row per (run, sample, cfg_branch, step, block, token)."""
    fields = list(_KEY_FIELDS)
    fields += [pa.field("attn_in_rel_l2_prev", pa.float16()), pa.field("moe_in_rel_l2_prev", pa.float16())]
    for unit in TOKEN_UNITS:
        fields.append(pa.field(f"{unit}_norm", pa.float16(), nullable=False))
        fields += lag_fields(f"{unit}_", lags)
    return pa.schema(fields, metadata={b"moeca_schema_version": str(SCHEMA_VERSION).encode(),
                                       b"moeca_table": b"tokens"})


def vector_schema() -> pa.Schema:
    """Full float16 vectors for a sampled subset of tokens (``--dump-vectors N``).

    kind: ``attn``, ``moe``, ``shared``, ``expert`` (then ``expert`` is set, else -1), ``moe_in``.
    """
    return pa.schema(_KEY_FIELDS + [
        pa.field("kind", pa.dictionary(pa.int8(), pa.string()), nullable=False),
        pa.field("expert", pa.int16(), nullable=False),
        pa.field("vector", pa.list_(pa.float16()), nullable=False),
    ], metadata={b"moeca_schema_version": str(SCHEMA_VERSION).encode(), b"moeca_table": b"vectors"})
