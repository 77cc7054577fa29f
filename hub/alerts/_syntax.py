"""The small languages inside the alerting file: durations and label matchers.

Both are spelled as Prometheus and Alertmanager spell them, so that rules and routes
can be copied between the two:

* a duration is ``500ms``, ``30s``, ``5m``, ``4h``, ``1d``, ``2w``, ``1y`` or units
  combined largest first (``1h30m``), or a plain number of seconds (``0``, ``2.5``);
* a matcher is ``name="value"``, ``name!="value"``, ``name=~"regex"`` or
  ``name!~"regex"``; the quotes may be left out of a value without spaces, quotes,
  commas, braces or ``=``. Inside quotes, ``\\"``, ``\\\\`` and ``\\n`` are escapes and any
  other backslash is kept (so ``"host\\d+"`` is the regex ``host\\d+``).

The text parsers raise ``ValueError`` with the reason only; the ``read_*`` functions
read a value of the document (a :class:`~hub.infra._reader.Node`) and fail naming the
file and the key path.
"""

from __future__ import annotations

import math
import re

from handlers.alert_rules import Matcher
from handlers.alert_syntax import (
    LABEL_NAME,
    is_label_name,
    make_matcher,
    parse_duration,
    parse_matcher,
)
from hub.infra._reader import Node, describe

__all__ = [
    "LABEL_NAME",
    "is_label_name",
    "make_matcher",
    "parse_duration",
    "parse_matcher",
    "read_count",
    "read_duration",
    "read_label_names",
    "read_match",
    "read_matchers",
    "read_number",
    "read_string_map",
]

# --- the same, read from the document (errors name the file and the key path) ------------


def read_duration(node: Node, default: float, *, positive: bool = False) -> float:
    """Seconds from a duration string or a YAML number (absent: ``default``); never
    negative, and not zero either when ``positive``."""
    raw = node.value
    if raw is None:
        return default
    if isinstance(raw, str):
        try:
            seconds = parse_duration(raw.strip())
        except ValueError as exc:
            node.fail(str(exc))
    else:
        seconds = read_number(node, "a duration such as 30s or a number of seconds")
    if not math.isfinite(seconds) or seconds < 0:
        node.fail(f"must not be negative, got {raw!r}")
    if positive and seconds == 0:
        node.fail(f"must be longer than 0, got {raw!r}")
    return seconds


def read_number(node: Node, what: str) -> float:
    """A YAML number (integer or not; a boolean is not a number) as a finite float."""
    raw = node.value
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        node.fail(f"expected {what}, got {describe(raw)}")
    try:
        number = float(raw)
    except OverflowError:
        node.fail(f"{raw!r} is too large")
    if not math.isfinite(number):
        node.fail(f"expected a finite number, got {raw!r}")
    return number


def read_count(node: Node, default: int, limit: int) -> int:
    """A whole number 1..``limit`` (absent: ``default``)."""
    raw = node.value
    if raw is None:
        return default
    if isinstance(raw, bool) or not isinstance(raw, int) or not 1 <= raw <= limit:
        node.fail(f"expected a whole number from 1 to {limit}, got {raw!r}")
    return raw


def read_matchers(node: Node) -> tuple[Matcher, ...]:
    """A list of matchers: strings (``name="value"``) or ``{name, op, value}`` mappings."""
    return tuple(_read_matcher(item) for item in node.items())


def _read_matcher(node: Node) -> Matcher:
    if isinstance(node.value, dict):
        node.mapping(("name", "op", "value"))
        name = node.required("name").string()
        op = node.child("op").string("=")
        value = _label_value(node.child("value"))
        try:
            return make_matcher(name, op, value)
        except ValueError as exc:
            node.fail(str(exc))
    if not isinstance(node.value, str):
        got = describe(node.value)
        node.fail(f'expected a matcher string (name="value") or a mapping, got {got}')
    try:
        return parse_matcher(node.value)
    except ValueError as exc:
        node.fail(str(exc))


def read_match(node: Node, op: str) -> tuple[Matcher, ...]:
    """Alertmanager's older spelling: ``match: {name: value}`` (``op`` ``=``) or
    ``match_re: {name: regex}`` (``op`` ``=~``)."""
    matchers = []
    for name, value in node.entries() if not node.missing else []:
        try:
            matchers.append(make_matcher(name, op, _label_value(value)))
        except ValueError as exc:
            value.fail(str(exc))
    return tuple(matchers)


def read_label_names(node: Node) -> tuple[str, ...]:
    names = []
    for item in node.items():
        name = item.string()
        if not is_label_name(name):
            item.fail(f"expected a label name (letters, digits, _), got {name!r}")
        if name in names:
            item.fail(f"{name!r} is listed twice")
        names.append(name)
    return tuple(names)


def read_string_map(node: Node, key_pattern: re.Pattern[str], what: str) -> dict[str, str]:
    """A mapping of names (matching ``key_pattern``) to strings (integers are taken as
    their decimal text, as Prometheus reads ``priority: 1``)."""
    if node.missing:
        return {}
    result = {}
    for key, value in node.entries():
        if not key_pattern.fullmatch(key):
            value.fail(f"expected {what}, got {key!r}")
        result[key] = _label_value(value)
    return result


def _label_value(node: Node) -> str:
    raw = node.value
    if isinstance(raw, int) and not isinstance(raw, bool):
        return str(raw)
    if not isinstance(raw, str):
        node.fail(f"expected a string, got {describe(raw)}")
    return raw
