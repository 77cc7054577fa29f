"""Infrastructure monitor: what to watch (``config``), how to probe it (``checkers``) and
when (``scheduler``). Wiring results into events and projections lives elsewhere."""

from hub.infra._reader import InfraConfigError
from hub.infra.checkers import CheckResult, describe_error, run_check, with_passwords
from hub.infra.config import (
    METHODS,
    AlertsConfig,
    Component,
    HealthCheck,
    InfraConfig,
    ServiceDependency,
    default_components,
    load_infra_config,
    parse_infra_config,
)
from hub.infra.scheduler import CheckScheduler, ComponentStats

__all__ = [
    "METHODS",
    "AlertsConfig",
    "CheckResult",
    "CheckScheduler",
    "Component",
    "ComponentStats",
    "HealthCheck",
    "InfraConfig",
    "InfraConfigError",
    "ServiceDependency",
    "default_components",
    "describe_error",
    "load_infra_config",
    "parse_infra_config",
    "run_check",
    "with_passwords",
]
