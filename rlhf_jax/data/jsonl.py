"""Reading JSONL: one JSON object per line, every problem reported as `path:LINE: reason`.

Lines are split on b"\\n" only (never on the Unicode line separators `str.splitlines` honours,
which may legally appear inside JSON strings), so line numbers match what an editor shows.
Each line is decoded as strict UTF-8 (a leading BOM on line 1 is accepted). Blank lines are
ignored. Rejected: non-UTF-8 bytes, malformed JSON, the non-standard constants NaN / Infinity,
duplicate keys in an object, and rows that are not JSON objects. A file with no rows at all
(empty, or only blank lines) is an error.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from rlhf_jax.errors import RlhfJaxError
from rlhf_jax.storage import local_copy

_BOM = b"\xef\xbb\xbf"


class RowError(RlhfJaxError):
    """One bad row: `str(err)` is the full message `path:LINE: field 'name': problem`.

    `reason` is the message without the `path:LINE: ` prefix (what a skip report lists);
    `field` is None when the row as a whole is at fault (bad JSON, not an object).
    """

    def __init__(self, where: str, problem: str, field: str | None = None):
        self.where, self.problem, self.field = where, problem, field
        super().__init__(f"{where}: {self.reason}")

    @property
    def reason(self) -> str:
        return f"field {self.field!r}: {self.problem}" if self.field else self.problem


def location(path: str | None, line: int | None) -> str:
    """`path:LINE`, or what is known of it (examples built in code may have neither)."""
    if path is None:
        return f"line {line}" if line is not None else "<example>"
    return f"{path}:{line}" if line is not None else str(path)


def json_type(value: object) -> str:
    """The JSON name of a Python value's type, for messages ("got array")."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


class _Reject(ValueError):
    pass


def _object_no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    obj: dict = {}
    for key, value in pairs:
        if key in obj:
            raise _Reject(f"duplicate key {key!r} in a JSON object")
        obj[key] = value
    return obj


def _no_constants(name: str) -> float:
    raise _Reject(f"malformed JSON: {name} is not valid JSON")


def parse_line(raw: bytes, at: str) -> dict:
    """One line's bytes -> the row object; raises RowError naming `at` ("path:LINE")."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RowError(
            at, f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line)"
        ) from None
    try:
        obj = json.loads(
            text, object_pairs_hook=_object_no_duplicates, parse_constant=_no_constants
        )
    except _Reject as e:
        raise RowError(at, str(e)) from None
    except json.JSONDecodeError as e:
        raise RowError(at, f"malformed JSON: {e.msg} (column {e.colno})") from None
    except RecursionError:
        raise RowError(at, "malformed JSON: nested too deeply") from None
    if not isinstance(obj, dict):
        raise RowError(at, f"row is not a JSON object (got {json_type(obj)})")
    return obj


def read_jsonl(
    path: str | Path, skipped: list[tuple[int, str]] | None = None
) -> Iterator[tuple[int, dict]]:
    """Yield `(line, row)` for every non-blank line of `path` (1-based line numbers).

    With `skipped=None` the first bad line raises RowError; otherwise bad lines are appended to
    `skipped` as `(line, reason)` and reading goes on. Raises RlhfJaxError when the file cannot
    be read or holds no non-blank line.
    """
    name = str(path)
    try:
        f = local_copy(path, "data file").open("rb")  # noqa: SIM115 (closed by the `with f:` below)
    except FileNotFoundError:
        raise RlhfJaxError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise RlhfJaxError(f"{name}: is a directory, expected a JSONL file") from None
    except OSError as e:
        raise RlhfJaxError(f"{name}: cannot read ({e.strerror or e})") from None
    seen = False
    with f:
        for line, raw in enumerate(f, start=1):
            if line == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM) :]
            if not raw.strip():
                continue
            seen = True
            try:
                row = parse_line(raw, f"{name}:{line}")
            except RowError as e:
                if skipped is None:
                    raise
                skipped.append((line, e.reason))
                continue
            yield line, row
    if not seen:
        raise RlhfJaxError(f"{name}: empty file (no rows; blank lines are ignored)")
