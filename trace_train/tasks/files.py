"""Math records from local files: .jsonl (one record per line), .json (a list of records) or .parquet (one row
per record); each needs `problem`, `solution` and `answer` (strings or numbers), other fields are kept and
ignored. A file that cannot be used raises DataError naming the file, the line (JSONL, JSON) or the record /
row (from 0), and what is wrong."""

from __future__ import annotations

import json

from .base import DataError, Example

FIELDS = ("problem", "solution", "answer")


def _example(path: str, where: str, record) -> Example:
    if not isinstance(record, dict):
        raise DataError(path, where, f"expected an object with {', '.join(FIELDS)}, got {type(record).__name__}")
    for k in FIELDS:
        v = record.get(k)
        if v is None:
            raise DataError(path, where, f"field {k!r} is missing or null (need {', '.join(FIELDS)})")
        if not isinstance(v, (str, int, float)):
            raise DataError(path, where, f"field {k!r} must be a string or a number, got {type(v).__name__}")
    return Example(str(record["problem"]), str(record["solution"]), str(record["answer"]))


def _read_jsonl(path: str) -> list[Example]:
    out = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(path, f"line {n}", f"not UTF-8 (byte {e.start + 1} of the line)") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(path, f"line {n}", f"not valid JSON ({e.msg} at column {e.colno})") from None
            except RecursionError:
                raise DataError(path, f"line {n}", "not valid JSON (nested too deeply)") from None
            out.append(_example(path, f"line {n}", record))
    return out


def _read_json(path: str) -> list[Example]:
    with open(path, "rb") as f:
        data = f.read()
    try:
        records = json.loads(data)
    except json.JSONDecodeError as e:
        raise DataError(path, f"line {e.lineno}", f"not valid JSON ({e.msg} at column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise DataError(path, f"byte {e.start + 1}", "not UTF-8") from None
    except RecursionError:
        raise DataError(path, "", "not valid JSON (nested too deeply)") from None
    if not isinstance(records, list):
        raise DataError(path, "", f"expected a JSON list of records, got {type(records).__name__}")
    return [_example(path, f"record {i} (from 0)", r) for i, r in enumerate(records)]


def _read_parquet(path: str) -> list[Example]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError("reading Parquet needs pyarrow (pip install 'trace-kernels[train]')") from e
    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001 -- pyarrow raises several classes for a file it cannot read
        raise DataError(path, "", f"cannot read as Parquet ({type(e).__name__}: {str(e)[:200]})") from None
    missing = [k for k in FIELDS if k not in table.column_names]
    if missing:
        raise DataError(path, "", f"no column {missing} (have {table.column_names[:10]}; need {', '.join(FIELDS)})")
    return [_example(path, f"row {i} (from 0)", r) for i, r in enumerate(table.select(list(FIELDS)).to_pylist())]


def read_examples(path: str) -> list[Example]:
    """Records of a .jsonl / .json (a list) / .parquet file; each needs problem, solution and answer (strings
    or numbers). DataError names the file and the line or record of the first bad one."""
    try:
        if path.endswith(".parquet"):
            out = _read_parquet(path)
        elif path.endswith(".json"):
            out = _read_json(path)
        else:
            out = _read_jsonl(path)
    except OSError as e:
        raise DataError(path, "", f"cannot read ({e.strerror or e})") from None
    if not out:
        raise DataError(path, "", "no records")
    return out
