"""The small languages of alerting, spelled as Prometheus and Alertmanager spell them
(pure): durations and label matchers.

* a duration is ``500ms``, ``30s``, ``5m``, ``4h``, ``1d``, ``2w``, ``1y`` or units
  combined largest first (``1h30m``), or a plain number of seconds (``0``, ``2.5``);
* a matcher is ``name="value"``, ``name!="value"``, ``name=~"regex"`` or
  ``name!~"regex"``; the quotes may be left out of a value without spaces, quotes,
  commas, braces or ``=``. Inside quotes, ``\\"``, ``\\\\`` and ``\\n`` are escapes and any
  other backslash is kept (so ``"host\\d+"`` is the regex ``host\\d+``).

Every parser raises ``ValueError`` with the reason only: the rules file
(``hub.alerts._syntax``), the silence requests and ``hub.query.alerts`` say where.
"""

from __future__ import annotations

import re
from typing import get_args

from handlers.alert_rules import Matcher, MatchOp

__all__ = ["LABEL_NAME", "is_label_name", "make_matcher", "parse_duration", "parse_matcher"]

LABEL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

_UNITS_S = {"y": 365 * 86400.0, "w": 7 * 86400.0, "d": 86400.0, "h": 3600.0, "m": 60.0,
            "s": 1.0, "ms": 0.001}  # fmt: skip
# Each unit at most once, largest first (as Prometheus' model.ParseDuration).
_DURATION = re.compile("".join(rf"(?:(?P<{u}>[0-9]+){u})?" for u in _UNITS_S))
_SECONDS = re.compile(r"[0-9]+(?:\.[0-9]*)?")
_OPS: tuple[MatchOp, ...] = get_args(MatchOp)
# Longest operators first, so that "=~" is not read as "=" followed by "~...".
_MATCHER = re.compile(
    r"\s*(?P<name>[^\s=!~]*)\s*(?P<op>=~|!~|!=|=)\s*(?P<value>.*?)\s*\Z", re.DOTALL
)
_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_UNQUOTED_FORBIDDEN = re.compile(r'[\s"\',{}=]')
_ESCAPE = re.compile(r"\\(.)", re.DOTALL)
_MATCHER_FORMS = 'name="value", name!="value", name=~"regex" or name!~"regex"'


def is_label_name(text: str) -> bool:
    return LABEL_NAME.fullmatch(text) is not None


def parse_duration(text: str) -> float:
    """Seconds in a Prometheus duration (``1h30m`` -> 5400.0)."""
    if _SECONDS.fullmatch(text):
        return float(text)
    found = _DURATION.fullmatch(text)
    if not text or found is None:
        raise ValueError(
            f"expected a duration such as 500ms, 30s, 5m, 4h, 1d or 1h30m "
            f"(units largest first, each once) or a number of seconds, got {text!r}"
        )
    try:
        return sum(int(n) * _UNITS_S[unit] for unit, n in found.groupdict().items() if n)
    except OverflowError:
        raise ValueError(f"duration {text!r} is too long") from None


def parse_matcher(text: str) -> Matcher:
    """One Alertmanager matcher string (``severity="critical"``)."""
    found = _MATCHER.fullmatch(text)
    if found is None:
        raise ValueError(f"expected a matcher {_MATCHER_FORMS}, got {text!r}")
    name, op, raw = found["name"], found["op"], found["value"]
    _check_label_name(name)
    if raw.startswith('"'):
        if not _QUOTED.fullmatch(raw):
            raise ValueError(f'malformed quoted value in matcher {text!r} (one "..." string)')
        value = _ESCAPE.sub(_unescape, raw[1:-1])
    elif _UNQUOTED_FORBIDDEN.search(raw):
        raise ValueError(
            f"quote the value of matcher {text!r} (an unquoted value may not hold "
            "spaces, quotes, commas, braces or '=')"
        )
    else:
        value = raw
    return make_matcher(name, op, value)


def make_matcher(name: str, op: str, value: str) -> Matcher:
    """A matcher from its parts, checked: a label name, a known operator, a regex that
    compiles (as written, and as the anchored pattern ``Matcher`` runs)."""
    _check_label_name(name)
    for known in _OPS:
        if op == known:
            if op in ("=~", "!~"):
                _check_regex(value)
            return Matcher(name=name, op=known, value=value)
    raise ValueError(f"unknown operator {op!r} (expected one of: {', '.join(_OPS)})")


def _check_label_name(name: str) -> None:
    if not is_label_name(name):
        raise ValueError(
            f"expected a label name (letters, digits, _; not starting with a digit) "
            f"before the operator, got {name!r}"
        )


def _check_regex(pattern: str) -> None:
    for candidate in (pattern, rf"(?:{pattern})\Z"):
        try:
            re.compile(candidate)
        except (re.error, OverflowError) as exc:
            raise ValueError(f"invalid regex {pattern!r}: {exc}") from None
        except RecursionError:
            raise ValueError(f"invalid regex {pattern!r}: nested too deeply") from None


def _unescape(escape: re.Match[str]) -> str:
    char = escape.group(1)
    return {"n": "\n", '"': '"', "\\": "\\"}.get(char, escape.group(0))
