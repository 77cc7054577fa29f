"""The infrastructure monitor inside the hub: checks become events.

Every result is submitted to the ingest loop as an ``InfraChecked`` candidate, where
the pure handler (``handlers.infra``) records it and, on a transition, an
``InfraStatusChanged``: the same single writer and order as everything else, so
the history of the infrastructure replays like the registry. Each (re)load of the
component set is recorded as ``InfraConfigLoaded``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import msgspec
import structlog

from events.model import Event, InfraChecked, InfraConfigLoaded
from events.names import INFRA_TENANT
from hub.config import HubConfig
from hub.infra.checkers import CheckResult, with_passwords
from hub.infra.config import Component, InfraConfig, default_components, load_infra_config
from hub.infra.scheduler import CheckScheduler

log = structlog.get_logger(__name__)


def monitored(config: HubConfig) -> InfraConfig:
    """What the hub watches: the file's components (``HUB_INFRA_CONFIG``) and, unless
    ``HUB_INFRA_SELF=0``, its own stack (a file component of the same name wins).

    Raises:
        InfraConfigError: the file is bad (naming the file, key and reason).
    """
    own = default_components(config) if config.infra_self else InfraConfig(components=())
    if not config.infra_config:
        return own
    loaded = load_infra_config(config.infra_config)
    names = {c.name for c in loaded.components}
    extra = tuple(c for c in own.components if c.name not in names)
    return msgspec.structs.replace(loaded, components=loaded.components + extra)


def without_credentials(endpoint: str) -> str:
    """An endpoint URL without ``user:password@`` (the views and the log are not secret)."""
    parts = urlsplit(endpoint)
    if parts.username is None and parts.password is None:
        return endpoint
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit(parts._replace(netloc=netloc))


def describe(component: Component) -> dict[str, Any]:
    """A component as the views show its configuration (credentials left out)."""
    check = component.health_check
    return {
        "name": component.name, "section": component.section, "type": component.type,
        "host": component.host, "port": component.port, "critical": component.critical,
        "method": check.method, "endpoint": without_credentials(check.endpoint),
        "interval_s": check.interval, "timeout_s": check.timeout,
        "dependencies": list(component.dependencies), "description": component.description,
        "management_port": component.management_port,
    }  # fmt: skip


def loaded_event(infra: InfraConfig, now: float) -> InfraConfigLoaded:
    components = [describe(c) for c in infra.components]
    deps = {s.name: list(s.requires) for s in infra.service_dependencies}
    digest = hashlib.sha256(msgspec.json.encode([components, deps])).hexdigest()[:16]
    return InfraConfigLoaded(
        event_id=f"infra-config@{now:.6f}", tenant=INFRA_TENANT, ts=now,
        source=infra.source, digest=digest, components=components, service_dependencies=deps,
    )  # fmt: skip


class InfraMonitor:
    """Schedules the checks and submits their results (and reloads) as events."""

    def __init__(
        self,
        config: HubConfig,
        submit: Callable[[Event], None],
        clock: Callable[[], float],
        recorded_digest: Callable[[], str] = lambda: "",
        infra: InfraConfig | None = None,
    ) -> None:
        self._config = config
        self._submit = submit
        self._clock = clock
        self._recorded_digest = recorded_digest
        self.infra = infra if infra is not None else monitored(config)
        passwords = {c.name: config.postgres_password for c in self.infra.components
                     if c.name.startswith("hub-postgres")}  # fmt: skip
        passwords |= {c.name: config.redis_password for c in self.infra.components
                      if c.name.startswith("hub-redis")}  # fmt: skip
        self.scheduler = CheckScheduler(self.infra, self._on_result,
                                        check=with_passwords(passwords))  # fmt: skip

    async def start(self) -> None:
        self._record_config()
        await self.scheduler.start()

    def _record_config(self) -> None:
        """Record the component set unless the log already says exactly this (a restart
        with the same file adds nothing; nothing monitored, ever, records nothing)."""
        event = loaded_event(self.infra, self._clock())
        recorded = self._recorded_digest()
        if event.digest != recorded and (self.infra.components or recorded):
            self._submit(event)

    async def stop(self) -> None:
        await self.scheduler.stop()

    async def reload(self) -> bool:
        """Re-read the file (SIGHUP); a bad file is logged and the old set kept."""
        try:
            infra = monitored(self._config)
        except Exception as exc:
            log.error("infra.reload_failed", error=str(exc))
            return False
        self.infra = infra
        self._record_config()
        await self.scheduler.replace(infra)
        log.info("infra.reloaded", components=len(infra.components), source=infra.source)
        return True

    async def _on_result(self, component: Component, result: CheckResult, at: float) -> None:
        self._submit(InfraChecked(
            event_id=f"infra-{component.name}@{at:.6f}", tenant=INFRA_TENANT, ts=at,
            component=component.name, status=result.status,
            response_time_ms=round(result.response_time_ms, 3), error=result.error,
            metadata=dict(result.metadata),
        ))  # fmt: skip
