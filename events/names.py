"""Name rules shared by the wire contract, subjects and storage keys."""

from __future__ import annotations

import re

# Service names, instance ids and tenants: safe in a NATS subject token, a Redis
# key segment and a SQL literal alike (no dots would be stricter, but the seed's
# names such as "data-bridge.v2" use them; tenants never reach a subject with a dot
# because a tenant is one subject token).
NAME_PATTERN = r"[a-z0-9][a-z0-9._-]{0,62}"
TENANT_PATTERN = r"[a-z0-9][a-z0-9_-]{0,62}"
_NAME_RE = re.compile(NAME_PATTERN)
_TENANT_RE = re.compile(TENANT_PATTERN)

DEFAULT_TENANT = "default"
# Pseudo-tenant under which input with an invalid or unknown tenant is recorded;
# it cannot clash with a real tenant because real ones match TENANT_PATTERN.
INVALID_TENANT = "_invalid"
# Pseudo-tenant of the hub's own facts about shared infrastructure (not any tenant's).
INFRA_TENANT = "_infra"
# Pseudo-tenant of the hub's notices about itself that are not events of the log
# (hub.events._hub.log_stalled: they must reach watchers while the log is down).
HUB_TENANT = "_hub"


def is_name(value: str) -> bool:
    return _NAME_RE.fullmatch(value) is not None


def is_tenant(value: str) -> bool:
    return _TENANT_RE.fullmatch(value) is not None
