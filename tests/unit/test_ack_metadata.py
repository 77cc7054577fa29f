"""The ingest loop's own parse of a JetStream reply subject equals nats-py's Msg.metadata."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from nats.aio.msg import Msg

from hub.ingest import ack_metadata

SEQ = st.integers(1, 2**63 - 1)
NANOS = st.integers(0, 4_000_000_000 * 10**9)  # up to the year 2096


def _nats_py(reply: str) -> tuple[int, float, int, int]:
    md = Msg(_client=None, subject="hub.heartbeat", reply=reply).metadata  # type: ignore[arg-type]
    return md.sequence.stream, md.timestamp.timestamp(), md.num_pending, md.num_delivered


@given(seq=SEQ, consumer_seq=SEQ, ns=NANOS, pending=st.integers(0, 2**40),
       delivered=st.integers(1, 100), token=st.booleans())  # fmt: skip
def test_both_reply_forms_parse_as_nats_py_parses_them(
    seq: int, consumer_seq: int, ns: int, pending: int, delivered: int, token: bool
) -> None:
    v1 = f"$JS.ACK.HUB_INGRESS.hub-ingest.{delivered}.{seq}.{consumer_seq}.{ns}.{pending}"
    v2 = (f"$JS.ACK._.ACCHASH.HUB_INGRESS.hub-ingest.{delivered}.{seq}.{consumer_seq}.{ns}"
          f".{pending}" + (".r4nd0m" if token else ""))  # fmt: skip
    for reply in (v1, v2):
        assert (
            ack_metadata(reply)
            == _nats_py(reply)
            == (seq, ack_metadata(reply)[1], pending, delivered)
        )


@pytest.mark.parametrize("reply", ["", "hub.heartbeat", "$JS.ACK.a.b.c", "_INBOX.x.y.z.1.2.3.4.5"])
def test_anything_else_is_refused(reply: str) -> None:
    with pytest.raises(ValueError):
        ack_metadata(reply)
