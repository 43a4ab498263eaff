"""Parse user uploads as JSON or Parquet only (never pickle, never eval), with clear errors.

The Streamlit pages hand the raw bytes and the file name here; every failure raises
:class:`UploadError` whose message says what was wrong and what is expected, and the page shows it with
``st.error`` and carries on.
"""
from __future__ import annotations

import io

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from moeca.common.jsontext import JSONInputError
from moeca.common.jsontext import parse_json as parse_checked

MAX_UPLOAD_BYTES = 64 << 20
MAX_TABLE_ROWS = 5_000_000
"""Most rows the explorer reads from one report table or upload (a report's summary holds ~10^4..10^5)."""
PARQUET_MAGIC = b"PAR1"


class UploadError(ValueError):
    """An upload that is not what the page accepts."""


def _check_size(data: bytes, name: str) -> None:
    if not data:
        raise UploadError(f"{name}: the file is empty")
    if len(data) > MAX_UPLOAD_BYTES:
        raise UploadError(f"{name}: {len(data) / 2**20:.1f} MiB is over the {MAX_UPLOAD_BYTES >> 20} MiB upload limit")


def parse_json(data: bytes, name: str = "upload") -> object:
    """Decode UTF-8 JSON; NaN/Infinity literals are refused (they are not JSON)."""
    _check_size(data, name)
    if data[:4] == PARQUET_MAGIC:
        raise UploadError(f"{name}: this is a Parquet file, but a JSON file is expected here")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UploadError(f"{name}: not UTF-8 text (byte {exc.start}); a JSON file is expected") from None
    try:
        return parse_checked(text, name, "upload a JSON file moeca wrote", constants=False)
    except JSONInputError as exc:
        raise UploadError(str(exc)) from None


def read_parquet_bounded(source, name: str) -> pd.DataFrame:
    """A Parquet file (path or file object) as a DataFrame, refused *before* any data is read when its footer
    claims more than :data:`MAX_TABLE_ROWS` rows: a footer can say anything, and the explorer must not allocate
    because a file says so. No pickled pandas metadata objects are executed."""
    try:
        pf = pq.ParquetFile(source)
        rows = pf.metadata.num_rows
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise UploadError(f"{name}: damaged Parquet file ({str(exc).splitlines()[0] if str(exc) else exc!r})") \
            from None
    if rows > MAX_TABLE_ROWS:
        raise UploadError(f"{name}: its footer claims {rows:,} rows, more than the {MAX_TABLE_ROWS:,} the explorer "
                          "shows as a table (moeca's summary and curve tables hold far fewer); the file is damaged or "
                          "not a moeca table, so it is not read")
    try:
        table = pf.read()
    except (pa.ArrowException, OSError, ValueError, MemoryError) as exc:
        raise UploadError(f"{name}: damaged Parquet file ({str(exc).splitlines()[0] if str(exc) else exc!r})") \
            from None
    try:
        return table.to_pandas(ignore_metadata=True)
    except (pa.ArrowException, ValueError, TypeError) as exc:
        raise UploadError(f"{name}: Parquet columns cannot be shown as a table ({exc})") from None


def parse_parquet(data: bytes, name: str = "upload") -> pd.DataFrame:
    """Read an uploaded Parquet file into a DataFrame (:func:`read_parquet_bounded`)."""
    _check_size(data, name)
    if len(data) < 12 or data[:4] != PARQUET_MAGIC or data[-4:] != PARQUET_MAGIC:
        raise UploadError(f"{name}: not a Parquet file (it must start and end with the bytes 'PAR1'); "
                          "upload a .parquet file written by moeca, pandas or pyarrow")
    return read_parquet_bounded(io.BytesIO(data), name)


def parse_table(data: bytes, name: str) -> pd.DataFrame:
    """A table upload: ``.parquet`` or ``.json`` (a list of row objects, or a bench result with ``rows``)."""
    lower = name.lower()
    if lower.endswith(".parquet"):
        return parse_parquet(data, name)
    if lower.endswith(".json"):
        doc = parse_json(data, name)
        rows = doc.get("rows") if isinstance(doc, dict) else doc
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise UploadError(f"{name}: expected a JSON list of row objects, or an object with a 'rows' list")
        return pd.DataFrame(rows)
    raise UploadError(f"{name}: only .parquet and .json files are accepted")
