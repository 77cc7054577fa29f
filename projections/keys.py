"""The key schema of the Redis view: every key name, spelled once.

The writer (``projections.redis``), the readers (``projections.redis_read``, the
query responders), replay/verify and the benchmarks build and parse keys only
through this module. Keys (``<t>`` = tenant, ``<p>`` = a projection's name):

* ``hub:<t>:services``                  SET of services with live instances
* ``hub:<t>:svc:<service>``             SET of the service's live instance ids
* ``hub:<t>:inst:<service>:<instance>`` HASH of one live instance; its ``doc`` field
                                        holds the fields that change only on
                                        registration, rendered as answers show them
* ``hub:<t>:index``                     ZSET of the live instances, every score 0, member
                                        ``<service> <instance>``: pages in (service,
                                        instance) order by ZRANGEBYLEX; ZCARD counts them
* ``hub:<t>:counts:<service>``          HASH of the service's live instances by
                                        ``status:<status>``, ``flapping`` and ``trusted``
                                        (healthy, not flapping); non-zero counts only
* ``hub:<t>:stats``                     HASH of counters (``rejected``, ``rejected:<code>``)
* ``hub:<t>:preservation``              HASH since/until, while the tenant self-preserves
* ``hub:_meta:tenants``                 SET of tenants that ever registered an instance
* ``hub:_infra:components``             SET of monitored infrastructure components
* ``hub:_infra:component:<name>``       HASH status, last check and configuration
* ``hub:_infra:config``                 HASH configuration digest, service_dependencies
* ``hub:_meta:checkpoint:<p>``          HASH partition -> next position
* ``hub:_meta:view:<p>``                HASH ``state`` (``ready`` | ``rebuilding``),
                                        ``since``, ``reason``: what queries are told

The last two are the view's bookkeeping, not the view (verify and rebuild leave them
out). A rebuild writes the view under ``SHADOW_PREFIX`` first, then renames each key
to ``PREFIX``. Tenant and service names cannot hold ``:`` (``events.names``), so a key
splits on it unambiguously; ``_meta`` is no tenant's name.
"""

from __future__ import annotations

from typing import Literal

from events.names import INFRA_TENANT

PREFIX = "hub"
# Where a rebuild writes the view before swapping it in.
SHADOW_PREFIX = "hubreplay"
# Held while a rebuild runs (``hub replay`` and a projector healing its view share the
# shadow keyspace).
REBUILD_LOCK_KEY = "hubreplay-lock"
META = "_meta"

# The third segment of a key (``<prefix>:<tenant>:<kind>...``): what the key holds.
SERVICES = "services"
SERVICE = "svc"
INSTANCE = "inst"
INDEX = "index"
COUNTS = "counts"
STATS = "stats"
PRESERVATION = "preservation"
TENANTS = "tenants"
COMPONENTS = "components"
COMPONENT = "component"
CONFIG = "config"
CHECKPOINT = "checkpoint"
VIEW_STATE = "view"

_HASHES = frozenset({INSTANCE, COUNTS, STATS, PRESERVATION, COMPONENT, CONFIG})
_ZSETS = frozenset({INDEX})
_BOOKKEEPING = (f"{META}:{CHECKPOINT}:", f"{META}:{VIEW_STATE}:")


def services_key(tenant: str, prefix: str = PREFIX) -> str:
    return f"{prefix}:{tenant}:{SERVICES}"


def service_key(tenant: str, service: str, prefix: str = PREFIX) -> str:
    return f"{prefix}:{tenant}:{SERVICE}:{service}"


def instance_key(tenant: str, service: str, instance: str, prefix: str = PREFIX) -> str:
    return f"{prefix}:{tenant}:{INSTANCE}:{service}:{instance}"


def index_key(tenant: str, prefix: str = PREFIX) -> str:
    return f"{prefix}:{tenant}:{INDEX}"


def counts_key(tenant: str, service: str, prefix: str = PREFIX) -> str:
    return f"{prefix}:{tenant}:{COUNTS}:{service}"


def stats_key(tenant: str, prefix: str = PREFIX) -> str:
    return f"{prefix}:{tenant}:{STATS}"


def preservation_key(tenant: str, prefix: str = PREFIX) -> str:
    return f"{prefix}:{tenant}:{PRESERVATION}"


def tenants_key(prefix: str = PREFIX) -> str:
    return f"{prefix}:{META}:{TENANTS}"


def components_key(prefix: str = PREFIX) -> str:
    return f"{prefix}:{INFRA_TENANT}:{COMPONENTS}"


def component_key(name: str, prefix: str = PREFIX) -> str:
    return f"{prefix}:{INFRA_TENANT}:{COMPONENT}:{name}"


def infra_config_key(prefix: str = PREFIX) -> str:
    return f"{prefix}:{INFRA_TENANT}:{CONFIG}"


TENANTS_KEY = tenants_key()
INFRA_COMPONENTS_KEY = components_key()
INFRA_CONFIG_KEY = infra_config_key()


def checkpoint_key(projection: str) -> str:
    """The projection's checkpoint (bookkeeping, not part of the view)."""
    return f"{PREFIX}:{META}:{CHECKPOINT}:{projection}"


def view_key(projection: str) -> str:
    """The view's state for its readers (bookkeeping, not part of the view)."""
    return f"{PREFIX}:{META}:{VIEW_STATE}:{projection}"


# --- patterns and parsing ---------------------------------------------------------------


def every_key(prefix: str = PREFIX) -> str:
    """A SCAN pattern matching every key under ``prefix`` (bookkeeping included)."""
    return f"{prefix}:*"


def instance_keys(tenant: str = "*", prefix: str = PREFIX) -> str:
    """A SCAN pattern matching the instance hashes of ``tenant`` (default: every one)."""
    return f"{prefix}:{tenant}:{INSTANCE}:*"


def is_bookkeeping(key: str, prefix: str = PREFIX) -> bool:
    """Whether ``key`` (a key under ``prefix``) is a checkpoint or a view state rather
    than part of the view."""
    return key.startswith(_BOOKKEEPING, len(prefix) + 1)


def tenant_of(key: str) -> str:
    return key.split(":", 2)[1]


def kind_of(key: str) -> str:
    """The key's kind (``INSTANCE``, ``SERVICE``, ...): its third segment."""
    parts = key.split(":", 3)
    return parts[2] if len(parts) > 2 else ""


def value_type(key: str) -> Literal["hash", "zset", "set"]:
    """The Redis type of a key of the view, told by its kind (saves a TYPE per key)."""
    kind = kind_of(key)
    return "hash" if kind in _HASHES else "zset" if kind in _ZSETS else "set"


def instance_of(key: str) -> tuple[str, str, str] | None:
    """(tenant, service, instance) of an instance hash's key; None for any other key."""
    parts = key.split(":")
    if len(parts) == 5 and parts[2] == INSTANCE:
        return parts[1], parts[3], parts[4]
    return None


def component_of(key: str) -> str | None:
    """The name of an infrastructure component's hash; None for any other key."""
    parts = key.split(":")
    if len(parts) == 4 and parts[1:3] == [INFRA_TENANT, COMPONENT]:
        return parts[3]
    return None


def moved_to(key: str, old: str, new: str = PREFIX) -> str:
    """``key`` (under ``old``) under prefix ``new`` instead."""
    return new + key[len(old) :]


# --- the index of live instances --------------------------------------------------------

# One member per live instance, ``<service> <instance>``. The separator sorts below
# every character a name may hold, so member order is (service, instance) order, the
# order queries page in.
INDEX_SEP = " "


def index_member(service: str, instance: str) -> str:
    return f"{service}{INDEX_SEP}{instance}"


def split_member(member: str) -> tuple[str, str]:
    """(service, instance) of an index member."""
    service, _, instance = member.partition(INDEX_SEP)
    return service, instance


# Just above the separator: the end of one service's members in the index.
_AFTER_SEP = chr(ord(INDEX_SEP) + 1)


def service_members(service: str) -> tuple[str, str]:
    """The ZRANGEBYLEX bounds (inclusive start, exclusive end) of the service's members."""
    return f"[{service}{INDEX_SEP}", f"({service}{_AFTER_SEP}"


def before_service(service: str) -> str:
    """The ZRANGEBYLEX bound that ends just before the service's first member."""
    return f"({service}{INDEX_SEP}"
