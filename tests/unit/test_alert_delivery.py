"""The pure decisions of sending: what an HTTP answer means (ok, worth another try,
permanent), reading ``Retry-After``, and the backoff between tries."""

from __future__ import annotations

import random

import pytest

from handlers.alert_rules import Integration
from hub.alerts.dispatch import backoff_delay
from hub.alerts.receivers import classify, expand, parse_retry_after, redact

NOW = 1_750_000_000.0  # Sun, 15 Jun 2025 15:06:40 GMT


def test_2xx_is_delivered_and_only_2xx():
    """Any 2xx is taken; a redirect is not followed and not retried."""
    assert [classify(s, None, now=NOW).outcome for s in (200, 202, 204, 299)] == ["ok"] * 4
    assert classify(301, None, now=NOW).outcome == "permanent"


def test_timeouts_throttling_and_server_errors_are_worth_another_try():
    """408, 425, 429 and every 5xx may succeed later."""
    for status in (408, 425, 429, 500, 502, 503, 599):
        delivery = classify(status, None, now=NOW)
        assert (delivery.outcome, delivery.reason) == ("retry", f"HTTP {status}"), status


def test_other_client_errors_are_permanent():
    """A 400, 401, 404, 410 or 422 will be the same answer next time."""
    for status in (400, 401, 403, 404, 410, 422):
        assert classify(status, None, now=NOW).outcome == "permanent", status


def test_retry_after_in_seconds_or_as_an_http_date():
    """Delta-seconds as given; an HTTP-date as the seconds from now until then (never
    negative); anything else is ignored."""
    assert classify(429, "2", now=NOW).retry_after == 2.0
    assert parse_retry_after(" 120 ", now=NOW) == 120.0
    assert parse_retry_after("Sun, 15 Jun 2025 15:07:10 GMT", now=NOW) == 30.0
    assert parse_retry_after("Sun, 15 Jun 2025 15:00:00 GMT", now=NOW) == 0.0
    for junk in (None, "", "soon", "-5", "1.5"):
        assert parse_retry_after(junk, now=NOW) is None, junk


def test_backoff_doubles_per_attempt_up_to_the_maximum_with_equal_jitter():
    """Try n waits between half and all of ``backoff_s * 2**(n-1)``, capped at
    ``max_backoff_s``."""
    integration = Integration(type="webhook", backoff_s=1.0, max_backoff_s=10.0)
    rng = random.Random(7)
    for attempt, ceiling in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (5, 10.0), (500, 10.0)]:
        delays = [backoff_delay(integration, attempt, rng) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays), attempt
        assert max(delays) - min(delays) > ceiling / 4  # jittered, not fixed


def test_secret_references_are_filled_at_send_time_and_kept_out_of_errors() -> None:
    """``${NAME}`` in a webhook's url or headers comes from the environment when sending
    (the rules, recorded in the log, keep the reference); an error message that quotes
    the url says the reference again, not the value; an unset name is a KeyError."""
    secrets: dict[str, str] = {}
    url = expand("https://hooks.example/${HOOK_PATH}?k=${HOOK_KEY}", {"HOOK_PATH": "p/q",
                 "HOOK_KEY": "k3y"}, secrets)  # fmt: skip
    assert url == "https://hooks.example/p/q?k=k3y"
    assert redact(f"cannot connect to {url}", secrets) == (
        "cannot connect to https://hooks.example/${HOOK_PATH}?k=${HOOK_KEY}"
    )
    assert expand("no $HOOK_KEY or {HOOK_KEY} here", {"HOOK_KEY": "x"}, {}) == (
        "no $HOOK_KEY or {HOOK_KEY} here"
    )
    with pytest.raises(KeyError, match="MISSING"):
        expand("Bearer ${MISSING}", {}, {})
