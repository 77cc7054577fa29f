"""Reading untyped YAML data where every failure names the file and the key path.

``yaml.safe_load`` gives dicts, lists and scalars of any shape. msgspec could convert
them, but its errors speak of ``$.messaging[2]`` and cannot see through ``${VAR}``
references, so the infrastructure file is read by hand through :class:`Node`, which
carries the path of the value it wraps and fails with :class:`InfraConfigError`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

import yaml

# ${VAR} or ${VAR:-default}; the default may be empty but may not contain '}'.
_VARIABLE = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>[^}]*))?\}")
_INTEGER = re.compile(r"[+-]?[0-9]+")


class InfraConfigError(ValueError):
    """The infrastructure file cannot be used; the message names file, key path and reason."""

    def __init__(self, source: str, path: str, reason: str) -> None:
        where = f"{source}: {path}" if path else source
        super().__init__(f"{where}: {reason}")
        self.source = source
        self.path = path
        self.reason = reason


class _StrictLoader(yaml.SafeLoader):
    """``SafeLoader`` that refuses duplicate keys instead of keeping the last one silently.

    With the mapping form of a section, a duplicate key would otherwise drop a component.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[object] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: let SafeLoader report it
                break
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str, source: str) -> object:
    """Parse ``text`` (safe subset, no duplicate keys); YAML errors name their line."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # a SafeLoader: no arbitrary objects
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = exc.problem or exc.context or "malformed document"
        raise InfraConfigError(source, "", f"invalid YAML{where}: {problem}") from None
    except yaml.YAMLError as exc:
        raise InfraConfigError(source, "", f"invalid YAML: {exc}") from None
    except RecursionError:
        raise InfraConfigError(source, "", "invalid YAML: nested too deeply") from None


def describe(value: object) -> str:
    """A YAML-ish name for the type of ``value`` ('a list', 'an integer', ...)."""
    match value:
        case None:
            return "null"
        case bool():
            return "a boolean"
        case int():
            return "an integer"
        case float():
            return "a number"
        case str():
            return "a string"
        case list():
            return "a list"
        case dict():
            return "a mapping"
    return f"a {type(value).__name__}"


@dataclass(frozen=True)
class Node:
    """A value of the document, the path that leads to it, and what reading it needs."""

    value: object
    path: str
    source: str
    env: Mapping[str, str]

    # -- navigation ------------------------------------------------------------------------

    def child(self, key: str) -> Node:
        """The value under ``key`` of this mapping (``None`` if absent)."""
        value = self.value.get(key) if isinstance(self.value, dict) else None
        return Node(value, f"{self.path}.{key}" if self.path else key, self.source, self.env)

    def at(self, index: int, value: object) -> Node:
        return Node(value, f"{self.path}[{index}]", self.source, self.env)

    def fail(self, reason: str) -> NoReturn:
        raise InfraConfigError(self.source, self.path, reason)

    @property
    def missing(self) -> bool:
        return self.value is None

    # -- containers ------------------------------------------------------------------------

    def mapping(self, allowed: Collection[str] | None = None) -> dict[str, object]:
        """This value as a mapping with string keys, all of them in ``allowed`` if given."""
        if not isinstance(self.value, dict):
            self.fail(f"expected a mapping, got {describe(self.value)}")
        for key in self.value:
            if not isinstance(key, str):
                self.fail(f"keys must be strings, got {describe(key)} {key!r}")
            if allowed is not None and key not in allowed:
                known = ", ".join(sorted(allowed))
                self.child(key).fail(f"unknown key (expected one of: {known})")
        return self.value

    def entries(self) -> list[tuple[str, Node]]:
        """The (key, value) pairs of a mapping with string keys."""
        return [(key, self.child(key)) for key in self.mapping()]

    def items(self) -> list[Node]:
        """The elements of a list (a missing value is an empty list)."""
        if self.value is None:
            return []
        if not isinstance(self.value, list):
            self.fail(f"expected a list, got {describe(self.value)}")
        return [self.at(i, v) for i, v in enumerate(self.value)]

    def required(self, key: str) -> Node:
        node = self.child(key)
        if isinstance(self.value, dict) and key not in self.value:
            node.fail("missing key")
        if node.missing:
            node.fail("must not be empty (null)")
        return node

    # -- scalars ---------------------------------------------------------------------------

    def string(self, default: str = "") -> str:
        if self.value is None:
            return default
        if not isinstance(self.value, str):
            self.fail(f"expected a string, got {describe(self.value)}")
        return self.value

    def name(self) -> str:
        """A non-empty string without whitespace (component and service names)."""
        text = self.string()
        if not text or any(c.isspace() for c in text):
            self.fail(f"expected a non-empty name without spaces, got {text!r}")
        return text

    def boolean(self, default: bool) -> bool:
        if self.value is None:
            return default
        if not isinstance(self.value, bool):
            self.fail(f"expected true or false, got {describe(self.value)}")
        return self.value

    def seconds(self, default: float) -> float:
        """A finite, positive number of seconds."""
        if self.value is None:
            return default
        if isinstance(self.value, bool) or not isinstance(self.value, int | float):
            self.fail(f"expected a number of seconds, got {describe(self.value)}")
        seconds = float(self.value)
        if not math.isfinite(seconds) or seconds <= 0:
            self.fail(f"must be a positive number of seconds, got {self.value!r}")
        return seconds

    def names(self) -> tuple[str, ...]:
        return tuple(item.name() for item in self.items())

    # -- values that may reference the environment ----------------------------------------

    def interpolated(self, default: str = "") -> str:
        """A string whose ``${VAR}`` / ``${VAR:-default}`` references are replaced.

        As in the shell, ``:-`` also applies when the variable is set but empty.
        """
        if self.value is None:
            return default
        text = self.value if isinstance(self.value, str) else self.string()

        def replace(match: re.Match[str]) -> str:
            name, fallback = match["name"], match["default"]
            value = self.env.get(name, "")
            if value:
                return value
            if fallback is not None:
                return fallback
            if name in self.env:
                self.fail(f"environment variable {name} is empty (and no default given)")
            self.fail(f"environment variable {name} is not set (and no default given)")

        if "${" in _VARIABLE.sub("", text):
            self.fail(f"malformed variable reference in {text!r} (use ${{VAR}} or ${{VAR:-x}})")
        return _VARIABLE.sub(replace, text)

    def port(self) -> int:
        """A TCP port 1..65535, given as an integer or a string (e.g. ``${PG_PORT:-5432}``)."""
        raw = self.value
        if isinstance(raw, str):
            text = self.interpolated().strip()
            if not _INTEGER.fullmatch(text):
                self.fail(f"expected a port number, got {text!r}")
            raw = int(text)
        if isinstance(raw, bool) or not isinstance(raw, int):
            self.fail(f"expected a port number, got {describe(raw)}")
        if not 1 <= raw <= 65535:
            self.fail(f"port {raw} out of range 1..65535")
        return raw

    def optional_port(self) -> int | None:
        return None if self.value is None else self.port()
