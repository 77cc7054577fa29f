"""JSON codec of events: one typed decoder built once, pure bytes in and out."""

from __future__ import annotations

import msgspec

from events.model import AnyEvent, Event

_encoder = msgspec.json.Encoder()
_decoder: msgspec.json.Decoder[AnyEvent] = msgspec.json.Decoder(AnyEvent)


def encode_event(event: Event) -> bytes:
    """Encode an event as JSON bytes (with its ``type`` tag)."""
    return _encoder.encode(event)


def decode_event(data: bytes) -> AnyEvent:
    """Decode JSON bytes into the event type named by its ``type`` tag.

    Raises:
        msgspec.DecodeError: the bytes are not a valid event.
    """
    return _decoder.decode(data)
