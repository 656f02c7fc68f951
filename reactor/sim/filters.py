"""Twenty's REST filter language, as its parser reads it: `field[op]:value` predicates, `,` for AND at the top,
`and(…)`, `or(…)`, `not(…)`, dotted paths into composite fields, values quoted with " or ' (no escapes), `[a,b]`
lists for `in`, and NULL / NOT_NULL for `is`."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable
from typing import Any

Predicate = Callable[[dict[str, Any]], bool]
COMPARATORS = ("eq", "neq", "in", "containsAny", "is", "gt", "gte", "lt", "lte", "startsWith", "endsWith", "like",
               "ilike")  # fmt: skip
_PREDICATE = re.compile(r"^([A-Za-z_][\w.]*)\[(\w+)\]:(.*)$", re.DOTALL)


class FilterError(ValueError):
    """Answered as Twenty answers a bad filter: 400 with this message."""


def parse(text: str, fields: Iterable[str]) -> tuple[Predicate, bool]:
    """A predicate for `text`, and whether the filter mentions deletedAt (else Twenty hides the trash)."""
    known = set(fields)
    text = text.strip()
    if text.count("(") != text.count(")"):
        missing = text.count("(") - text.count(")")
        raise FilterError(f"'filter' invalid. {abs(missing)} close bracket is missing in the query")
    predicate = _expression(text, known) if "(" in text else _all([_predicate(p, known) for p in _split(text)])
    return predicate, "deletedAt" in text


def _expression(text: str, known: set[str]) -> Predicate:
    match = re.match(r"^(and|or|not)\((.*)\)$", text, re.DOTALL)
    if not match:
        return _predicate(text, known)
    name, inner = match.groups()
    parts = [_expression(part, known) for part in _split(inner)]
    if name == "and":
        return _all(parts)
    if name == "or":
        return lambda record: any(p(record) for p in parts)
    if len(parts) != 1:
        raise FilterError("'filter' invalid. 'not' conjunction should contain only 1 condition")
    only = parts[0]
    return lambda record: not only(record)


def _all(parts: list[Predicate]) -> Predicate:
    return lambda record: all(p(record) for p in parts)


def _split(text: str) -> list[str]:
    """Split on commas outside brackets, parentheses and quotes."""
    parts: list[str] = []
    current: list[str] = []
    depth, square, quote = 0, False, ""
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "\"'" and not square:
            quote = char
        elif char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        elif char == "[":
            square = True
        elif char == "]":
            square = False
        elif char == "," and depth == 0 and not square:
            parts.append("".join(current).strip())
            current = []
            continue
        current.append(char)
    if current:
        parts.append("".join(current).strip())
    return [p for p in parts if p]


def _value(raw: str) -> str:
    raw = raw.strip()
    if len(raw) >= 2 and raw[0] in "\"'" and raw[-1] in "\"'":
        return raw[1:-1]
    return raw


def _predicate(text: str, known: set[str]) -> Predicate:
    match = _PREDICATE.match(text.strip())
    if not match:
        raise FilterError(f"'filter' invalid for '{text}'. eg: price[gte]:10")
    path, op, raw = match.groups()
    if op not in COMPARATORS:
        raise FilterError(f"'filter' invalid for '{text}', comparator {op} not in {', '.join(COMPARATORS)}")
    if path.split(".")[0] not in known:
        raise FilterError(f"Field metadata not found for field: {path.split('.')[0]}")
    if op in ("in", "containsAny"):
        if not (raw.startswith("[") and raw.endswith("]")):
            raise FilterError(f"'filter' invalid for '{op}' operator. Received '{raw}' but array value expected")
        wanted = {_value(v) for v in raw[1:-1].split(",")}
    else:
        wanted = {_value(raw)}
    if path == "emails.primaryEmail":
        wanted = {w.lower() for w in wanted}
    value = next(iter(wanted))

    def test(record: dict[str, Any]) -> bool:
        found: Any = record
        for part in path.split("."):
            found = found.get(part) if isinstance(found, dict) else None
        if op == "is":
            return (found is None) == (value.upper() == "NULL")
        if found is None:
            return op == "neq"
        text_found = str(found).lower() if isinstance(found, bool) else str(found)
        if op == "eq":
            return text_found == value
        if op == "neq":
            return text_found != value
        if op in ("in", "containsAny"):
            return text_found in wanted
        if op in ("gt", "gte", "lt", "lte"):
            left, right = _comparable(found, value)
            return bool({"gt": left > right, "gte": left >= right, "lt": left < right, "lte": left <= right}[op])
        if op == "startsWith":
            return text_found.startswith(value)
        if op == "endsWith":
            return text_found.endswith(value)
        pattern = value.replace("%", "*")
        if op == "ilike":
            return fnmatch.fnmatchcase(text_found.lower(), pattern.lower())
        return fnmatch.fnmatchcase(text_found, pattern)

    return test


def _comparable(found: Any, value: str) -> tuple[Any, Any]:
    if isinstance(found, int | float) and not isinstance(found, bool):
        try:
            return float(found), float(value)
        except ValueError:
            pass
    return str(found), value
