"""The errors that reading and tokenizing data raise, and the helpers that word their messages.

Errors in the data are `DataError`s whose message names the file, the 1-based line (JSONL), record (JSON, builtin)
or row (parquet, datasets folder), what is wrong and the fix, e.g.::

    data.jsonl line 17: record has no 'completion' field (keys: prompt, answer). Fix the record or set
    data.on_error=skip to skip such records.

A record-level problem is raised as `BadRecord` (the reason and the fix) where it is found, without knowing where
the record is; `read_conversations` turns it into a DataError with the location (`data_error`), or counts it when
data.on_error=skip. A chat template that cannot give reliable response masks raises `TemplateError`.
"""
from __future__ import annotations

from typing import Any

from tokenclean.config import UserError

SKIP_FIX = "Fix the record or set data.on_error=skip to skip such records."


class DataError(UserError, ValueError):
    """A data file or record is unusable. The message names the file, the 1-based line/record/row, what is wrong and
    the fix. Attributes: `source` (the file), `where` (e.g. "line 17", or None for file-level problems), `reason`."""

    def __init__(self, message: str, *, source: str | None = None, where: str | None = None,
                 reason: str | None = None):
        super().__init__(message)
        self.source, self.where, self.reason = source, where, reason


class TemplateError(UserError, ValueError):
    """A chat template cannot give reliable response masks (e.g. it is not prefix-consistent)."""


class BadRecord(Exception):
    """A record-level problem; turned into a DataError (or counted) with the location by `read_conversations`."""

    def __init__(self, reason: str, fix: str = SKIP_FIX):
        super().__init__(reason)
        self.reason, self.fix = reason, fix


def data_error(source: str, where: str | None, reason: str, fix: str) -> DataError:
    """The DataError ``"{source} {where}: {reason}. {fix}"`` (where=None: a problem with the whole file)."""
    loc = f"{source} {where}" if where else str(source)
    return DataError(f"{loc}: {reason}. {fix}", source=str(source), where=where, reason=reason)


def type_name(x: Any, article: bool = False) -> str:
    """The JSON name of x's type, for messages: "null", "string", "object", ...; with article, "a string" etc."""
    if x is None:
        return "null"
    t = ("a boolean" if isinstance(x, bool) else "a number" if isinstance(x, (int, float)) else
         "a string" if isinstance(x, str) else "a list" if isinstance(x, (list, tuple)) else
         "an object" if isinstance(x, dict) else f"a {type(x).__name__}")
    return t if article else t.split(" ", 1)[1]


def key_list(d: dict) -> str:
    """The first 12 keys of d, comma-separated (", ..." after them when there are more), or "none"."""
    keys = [str(k) for k in d]
    return ", ".join(keys[:12]) + (", ..." if len(keys) > 12 else "") if keys else "none"
