"""The contract: event types, wire messages, subjects and codecs. No I/O."""

from events.codec import decode_event, encode_event
from events.model import (
    EVENT_TYPES,
    WATCH_KIND,
    AnyEvent,
    Event,
    HeartbeatReceived,
    InputRejected,
    ServiceDeregistered,
    ServiceRegistered,
    partition_key,
)
from events.vocab import Condition, Health, InfraStatus

__all__ = [
    "EVENT_TYPES",
    "WATCH_KIND",
    "AnyEvent",
    "Condition",
    "Event",
    "Health",
    "HeartbeatReceived",
    "InfraStatus",
    "InputRejected",
    "ServiceDeregistered",
    "ServiceRegistered",
    "decode_event",
    "encode_event",
    "partition_key",
]
