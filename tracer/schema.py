"""The trace format: one source of truth for the tracer (writer), analysis and app (readers).

A trace is a directory::

    TRACE_DIR/
      run.json                      # RunMeta: model, sampler, seeds, labels, versions, schema version
      branches/shard-00000.parquet  # one file per sample shard (a batch of samples traced together)
      tokens/shard-00000.parquet
      vectors/shard-00000.parquet   # only with --dump-vectors N

Shards are numbered globally (shard ``s`` holds samples ``s*batch_size .. (s+1)*batch_size - 1``), so
ranks of a distributed run never collide: each rank writes the shards it owns. A shard file is
written as ``shard-NNNNN.parquet.tmp`` and renamed when complete; a shard counts as complete when
every table it needs has its final file (``tracer.store.complete_shards``). Rows inside a file are
grouped by step and, within one model call, ordered by (block, cfg_branch, sample, token, slot); with
separate CFG calls the conditional call's rows of a step come before the unconditional call's.

``run.json`` (written atomically; see ``tracer.run.build_run_meta``): ``schema_version``,
``run_name`` (the ``run`` column), ``created``, ``model`` {name, checkpoint, config, fingerprint,
weights_hash, dtype, device}, ``sampler`` (SamplerConfig fields), ``steps``, ``cfg_scale``, ``seed``,
``batch_size``, ``num_samples``, ``num_shards``, ``labels`` and ``sample_seeds`` (per sample),
``lags``, ``dump_vectors``, ``vector_tokens`` {block: token ids}, ``step_t`` (model time per step),
``tables``, ``versions`` {moeca, torch, pyarrow, numpy, python}.

Metric conventions (all computed on the device where the model runs):
- ``rel_l2_lag{L}`` = ||v_s - v_{s-L}|| / (||v_{s-L}|| + 1e-12) and ``cos_lag{L}`` = cosine(v_s, v_{s-L}),
  where ``v_s`` is the unit's output at step ``s`` for the same sample, CFG branch, block and token
  (and, in ``branches``, the same expert). ``lag1`` is DESIGN's ``*_prev``.
- In ``branches`` a lag metric is null when that (token, expert) pair was not routed at step ``s - L``
  (no value to compare against) and at steps ``s < L``. In ``tokens`` they are null for ``s < L``.
- Expert outputs are *unweighted* (before the gate weight); ``out_norm`` is ||E_e(h_t)||.
- ``cfg_branch`` is 0 for the conditional (or unguided) pass and 1 for the unconditional pass.
- ``cos_lag{L}`` uses the law of cosines on the norms and ``||v_s - v_{s-L}||`` and is clamped to
  [-1, 1]; it is 0 when either vector is zero. ``rel_l2`` is ``inf`` in float16 when the change
  exceeds 65504 times the old norm (a near-zero old vector).
- Token-level ``*_in_rel_l2_prev`` is the lag-1 relative change of the unit's *input* (the modulated,
  normalised hidden state fed to attention / the MoE); in ``branches``, ``in_rel_l2_prev`` is the
  same quantity for the MoE input of that token (every expert of a token sees the same input).
- ``routed_prev`` is false at step 0; at steps ``s >= 1`` it says whether the (token, expert) pair
  was routed at step ``s - 1``; ``rel_l2_lag1``/``cos_lag1`` are null exactly where it is false.
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


RUN_META_FILE = "run.json"
SHARD_PATTERN = "shard-{shard:05d}.parquet"
TMP_SUFFIX = ".tmp"
KEY_COLUMNS = tuple(f.name for f in _KEY_FIELDS)
DICTIONARY_COLUMNS = ("run", "cfg_branch", "block", "slot", "expert", "kind", "step")
"""Small-integer / categorical columns written with dictionary encoding."""


def shard_file_name(shard: int) -> str:
    """``shard-00042.parquet`` for shard 42 (global shard index, independent of the rank)."""
    if shard < 0:
        raise ValueError(f"shard index must be >= 0, got {shard}")
    return SHARD_PATTERN.format(shard=shard)


def parse_shard_file_name(name: str) -> int | None:
    """Inverse of :func:`shard_file_name`; None for any other name (temporary files included)."""
    if not (name.startswith("shard-") and name.endswith(".parquet")):
        return None
    digits = name[len("shard-"):-len(".parquet")]
    return int(digits) if digits.isdigit() else None


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


VECTOR_TYPE = pa.list_(pa.field("element", pa.float16()))
"""float16 list; the child is named ``element`` as Parquet's compliant nested type reads back."""


def vector_schema() -> pa.Schema:
    """Full float16 vectors for a sampled subset of tokens (``--dump-vectors N``).

    kind: ``attn``, ``moe``, ``shared``, ``expert`` (then ``expert`` is set, else -1), ``moe_in``.
    """
    return pa.schema(_KEY_FIELDS + [
        pa.field("kind", pa.dictionary(pa.int8(), pa.string()), nullable=False),
        pa.field("expert", pa.int16(), nullable=False),
        pa.field("vector", VECTOR_TYPE, nullable=False),
    ], metadata={b"moeca_schema_version": str(SCHEMA_VERSION).encode(), b"moeca_table": b"vectors"})


def branch_metric_columns(lags: int = DEFAULT_LAGS) -> list[str]:
    """Float16 metric columns of ``branches`` after the fixed ones, in schema order."""
    return [f.name for f in lag_fields("", lags)]


def token_metric_columns(lags: int = DEFAULT_LAGS) -> list[str]:
    """All non-key columns of ``tokens`` in schema order."""
    return [f.name for f in token_schema(lags)][len(_KEY_FIELDS):]


def table_schema(table: str, lags: int = DEFAULT_LAGS) -> pa.Schema:
    """The schema of ``table`` (one of :data:`TABLES`)."""
    if table == "branches":
        return branch_schema(lags)
    if table == "tokens":
        return token_schema(lags)
    if table == "vectors":
        return vector_schema()
    raise ValueError(f"unknown trace table {table!r}; choose one of {', '.join(TABLES)}")


def tables_for(dump_vectors: int) -> tuple[str, ...]:
    """The tables a run writes: ``vectors`` only when vectors are dumped."""
    return TABLES if dump_vectors > 0 else TABLES[:2]
