"""Reading where alerts go: receivers and their integrations, the route tree, inhibit
rules, and the seed's ``channels`` list (the legacy form of one receiver).

Alertmanager's keys and meanings (``webhook_configs``, ``group_by: ['...']``,
``continue``, ``match``/``match_re``), with the hub's additions to an integration:
``send_resolved_when_silenced``, ``rate_limit``, ``max_attempts``, ``backoff``,
``max_backoff``. Failures are :class:`~hub.infra._reader.InfraConfigError` naming the
key path; ``hub.alerts.rules`` adds the file's context.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

import msgspec

from handlers.alert_rules import (
    DEFAULT_ROUTE,
    InhibitRule,
    Integration,
    Receiver,
    ReceiverType,
    Route,
)
from hub.alerts._syntax import (
    read_count,
    read_duration,
    read_label_names,
    read_match,
    read_matchers,
    read_number,
    read_string_map,
)
from hub.infra._reader import Node

__all__ = ["DEFAULT_RECEIVERS", "read_channels", "read_inhibit_rules", "read_receivers",
           "read_route"]  # fmt: skip

DEFAULT_RECEIVERS = (
    Receiver(name="default", integrations=(Integration(type="log"), Integration(type="nats"))),
)

# A receiver's name is part of the id of each of its integrations (``<receiver>/<type>/<i>``).
_RECEIVER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]*")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an HTTP token (RFC 9110)
# The seed's channel names; ``console`` was a log line on the terminal.
_CHANNELS: dict[str, ReceiverType] = {"log": "log", "console": "log", "nats": "nats"}

_ROUTE_KEYS = ("receiver", "group_by", "group_wait", "group_interval", "repeat_interval",
               "matchers", "match", "match_re", "continue", "routes")  # fmt: skip
_RECEIVER_KEYS = ("name", "log_configs", "nats_configs", "webhook_configs", "email_configs")
_MAX_COUNT = 1_000_000  # max_attempts, burst: more is a typo
_NOTIFY_KEYS = ("send_resolved", "send_resolved_when_silenced", "rate_limit")
_RETRY_KEYS = ("max_attempts", "backoff", "max_backoff")
# The integration types in the order their ids are numbered within a receiver.
_INTEGRATION_KEYS: dict[ReceiverType, tuple[str, ...]] = {
    "log": _NOTIFY_KEYS,
    "nats": (*_NOTIFY_KEYS, *_RETRY_KEYS),
    "webhook": (*_NOTIFY_KEYS, *_RETRY_KEYS, "url", "timeout", "headers"),
}
_INHIBIT_KEYS = ("source_matchers", "source_match", "source_match_re",
                 "target_matchers", "target_match", "target_match_re", "equal")  # fmt: skip


# --- receivers ------------------------------------------------------------------------------


def read_receivers(node: Node) -> tuple[Receiver, ...]:
    receivers: list[Receiver] = []
    first_seen: dict[str, str] = {}
    for item in node.items():
        receiver = _read_receiver(item)
        if receiver.name in first_seen:
            item.child("name").fail(
                f"duplicate receiver name {receiver.name!r} (first at {first_seen[receiver.name]})"
            )
        first_seen[receiver.name] = item.path
        receivers.append(receiver)
    if not receivers:
        node.fail("no receivers (a route needs one to send to)")
    return tuple(receivers)


def _read_receiver(node: Node) -> Receiver:
    node.mapping(_RECEIVER_KEYS)
    name_node = node.required("name")
    name = name_node.string()
    if not _RECEIVER_NAME.fullmatch(name):
        name_node.fail(f"expected a name of letters, digits and _ . : - , got {name!r}")
    if not node.child("email_configs").missing:
        node.child("email_configs").fail(
            "email notifications are not supported yet (use webhook_configs or nats_configs)"
        )
    integrations = [
        _read_integration(item, kind)
        for kind in _INTEGRATION_KEYS
        for item in node.child(f"{kind}_configs").items()
    ]
    if not integrations:
        node.fail(
            f"receiver {name!r} has no integrations "
            "(give log_configs, nats_configs or webhook_configs)"
        )
    return Receiver(name=name, integrations=tuple(integrations))


def _read_integration(node: Node, kind: ReceiverType) -> Integration:
    if node.missing:  # "- " or "- {}": every default
        node = Node({}, node.path, node.source, node.env)
    node.mapping(_INTEGRATION_KEYS[kind])
    fields: dict[str, object] = {
        "send_resolved": node.child("send_resolved").boolean(True),
        "send_resolved_when_silenced": node.child("send_resolved_when_silenced").boolean(True),
        **_read_rate_limit(node.child("rate_limit")),
    }
    if kind in ("nats", "webhook"):
        fields.update(_read_retries(node))
    if kind == "webhook":
        fields["url"] = _read_url(node.required("url"))
        fields["timeout_s"] = read_duration(node.child("timeout"), 10.0, positive=True)
        fields["headers"] = _read_headers(node.child("headers"))
    return msgspec.structs.replace(Integration(type=kind), **fields)


def _read_rate_limit(node: Node) -> dict[str, object]:
    if node.missing:
        return {}
    node.mapping(("per_second", "burst"))
    rate_node = node.required("per_second")
    per_second = read_number(rate_node, "a number of notifications per second")
    if per_second <= 0:
        rate_node.fail(f"must be above 0 (leave rate_limit out for no limit), got {per_second:g}")
    burst = read_count(node.child("burst"), 10, _MAX_COUNT)
    return {"rate_per_s": per_second, "burst": burst}


def _read_retries(node: Node) -> dict[str, object]:
    attempts = read_count(node.child("max_attempts"), 10, _MAX_COUNT)
    backoff = read_duration(node.child("backoff"), 1.0, positive=True)
    max_backoff = read_duration(node.child("max_backoff"), max(300.0, backoff), positive=True)
    if max_backoff < backoff:
        node.child("max_backoff").fail(f"{max_backoff:g} s is shorter than backoff ({backoff:g} s)")
    return {"max_attempts": attempts, "backoff_s": backoff, "max_backoff_s": max_backoff}


def _read_url(node: Node) -> str:
    url = node.string().strip()
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        node.fail(f"expected an http:// or https:// URL, got {url!r}")
    try:
        parts.port  # noqa: B018 -- raises on a malformed port
    except ValueError:
        node.fail(f"bad port in URL {url!r}")
    if not parts.hostname:
        node.fail(f"URL without a host: {url!r}")
    return url


def _read_headers(node: Node) -> dict[str, str]:
    headers = read_string_map(node, _HEADER_NAME, "an HTTP header name")
    for name, value in headers.items():
        if "\r" in value or "\n" in value:
            node.child(name).fail("a header value cannot contain a line break")
    return headers


def read_channels(node: Node) -> tuple[Receiver, ...]:
    """The seed's ``channels: [log, nats]``: the receiver ``default`` with those
    integrations (``console`` is a log line)."""
    kinds: list[ReceiverType] = []
    for item in node.items():
        channel = item.string()
        if channel not in _CHANNELS:
            item.fail(
                f"unknown channel {channel!r} (expected one of: {', '.join(_CHANNELS)}; "
                "webhooks are configured under receivers)"
            )
        if _CHANNELS[channel] not in kinds:
            kinds.append(_CHANNELS[channel])
    if not kinds:
        node.fail("no channels: alerts would go nowhere (set enabled: false to turn them off)")
    integrations = tuple(Integration(type=kind) for kind in kinds)
    return (Receiver(name="default", integrations=integrations),)


# --- the route tree ---------------------------------------------------------------------


def read_route(node: Node, receivers: tuple[Receiver, ...]) -> Route:
    """The root route: it needs a receiver and matches every alert; what it leaves unset
    is ``DEFAULT_ROUTE``'s (children inherit from it)."""
    node.mapping(_ROUTE_KEYS)
    for key in ("matchers", "match", "match_re", "continue"):
        if not node.child(key).missing:
            node.child(key).fail("the root route receives every alert: it takes no " + key)
    node.required("receiver")
    route = _read_route(node, {r.name for r in receivers})
    return Route(
        receiver=route.receiver,
        group_by=DEFAULT_ROUTE.group_by if route.group_by is None else route.group_by,
        group_wait_s=_or(route.group_wait_s, DEFAULT_ROUTE.group_wait_s),
        group_interval_s=_or(route.group_interval_s, DEFAULT_ROUTE.group_interval_s),
        repeat_interval_s=_or(route.repeat_interval_s, DEFAULT_ROUTE.repeat_interval_s),
        routes=route.routes,
    )


def check_default_route(node: Node, receivers: tuple[Receiver, ...]) -> None:
    """Without a ``route``, alerts go to the receiver ``default``: it must exist."""
    if DEFAULT_ROUTE.receiver not in {r.name for r in receivers}:
        node.fail(
            f"no route given, and the default route sends to receiver "
            f"{DEFAULT_ROUTE.receiver!r}, which receivers does not define "
            f"(name a receiver {DEFAULT_ROUTE.receiver!r} or give a route)"
        )


def _or(value: float | None, default: float | None) -> float | None:
    return default if value is None else value


def _read_route(node: Node, receivers: set[str]) -> Route:
    node.mapping(_ROUTE_KEYS)
    receiver_node = node.child("receiver")
    receiver = None if receiver_node.missing else receiver_node.string()
    if receiver is not None and receiver not in receivers:
        receiver_node.fail(
            f"unknown receiver {receiver!r} (receivers: {', '.join(sorted(receivers))})"
        )
    return Route(
        receiver=receiver,
        group_by=_read_group_by(node.child("group_by")),
        group_wait_s=_optional_duration(node.child("group_wait"), positive=False),
        group_interval_s=_optional_duration(node.child("group_interval"), positive=True),
        repeat_interval_s=_optional_duration(node.child("repeat_interval"), positive=True),
        matchers=(
            *read_matchers(node.child("matchers")),
            *read_match(node.child("match"), "="),
            *read_match(node.child("match_re"), "=~"),
        ),
        continue_=node.child("continue").boolean(False),
        routes=tuple(_read_route(child, receivers) for child in node.child("routes").items()),
    )


def _optional_duration(node: Node, *, positive: bool) -> float | None:
    return None if node.missing else read_duration(node, 0.0, positive=positive)


def _read_group_by(node: Node) -> tuple[str, ...] | None:
    """Label names, or ``['...']`` alone: every label (no grouping)."""
    if node.missing:
        return None
    if node.value == ["..."]:
        return ("...",)
    for item in node.items():
        if item.value == "...":
            item.fail("'...' (group by every label) must be the only entry of group_by")
    return read_label_names(node)


# --- inhibit rules ----------------------------------------------------------------------


def read_inhibit_rules(node: Node) -> tuple[InhibitRule, ...]:
    return tuple(_read_inhibit_rule(item) for item in node.items())


def _read_inhibit_rule(node: Node) -> InhibitRule:
    node.mapping(_INHIBIT_KEYS)
    sides = {}
    for side, without in (("source", "any alert would inhibit"), ("target", "it would mute")):
        sides[side] = (
            *read_matchers(node.child(f"{side}_matchers")),
            *read_match(node.child(f"{side}_match"), "="),
            *read_match(node.child(f"{side}_match_re"), "=~"),
        )
        if not sides[side]:
            node.fail(
                f"no {side} matchers (give {side}_matchers, or {side}_match / "
                f"{side}_match_re): without them {without} every alert"
            )
    return InhibitRule(
        source_matchers=sides["source"],
        target_matchers=sides["target"],
        equal=read_label_names(node.child("equal")),
    )
