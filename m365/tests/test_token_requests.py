"""How often the token endpoint is asked over a simulated day (a controllable clock), and that no
token is ever handed out with less than MIN_LIFE seconds left (the login of the connection that uses
it must succeed). Figures: README "Benchmarks" (benchmarks/run.py measures the same in Odoo)."""

import contextlib
import time
from unittest.mock import patch

import pytest

from m365.clouds import CLOUDS
from m365.identity import MIN_LIFE, AppCredentials, IdentityClient

SANDBOX_WITH_MAIL = False
REDIRECT_URI = "http://localhost:8069/microsoft365/oauth/callback"
SCOPES = CLOUDS["global"].delegated_scopes()
DAY, CRON = 24 * 3600, 300  # fetchmail's default interval: 5 minutes


@contextlib.contextmanager
def virtual_clock():
    """time.time() of this process (MSAL, the sandbox's token issuing) under the test's control."""
    clock = [time.time()]
    with patch("time.time", lambda: clock[0]):
        yield clock


def client_of(sandbox):
    return IdentityClient(
        AppCredentials(
            client_id=sandbox.app()["client_id"],
            authority=sandbox.authority(),
            client_secret=sandbox.secret(),
            ca_file=sandbox.ca_file,
        )
    )


def a_day_of_delegated_use(sandbox, min_life):
    """(token requests, least life a handed-out token had) over a day of a 5-minute cron."""
    client = client_of(sandbox)
    flow = client.start_sign_in(REDIRECT_URI, SCOPES, login_hint="alice@contoso.com")
    sign_in = client.finish_sign_in(flow, sandbox.sign_in(flow["auth_uri"], "alice@contoso.com"))
    before, least = sandbox.counter("token:refresh_token"), float("inf")
    with virtual_clock() as clock:
        for _run in range(DAY // CRON):
            token = client.access_token(SCOPES, sign_in.home_account_id, min_life=min_life)
            least = min(least, token.expires_at - clock[0])
            clock[0] += CRON
    return sandbox.counter("token:refresh_token") - before, least


@pytest.fixture
def hour_tokens(box):
    box.control("settings", access_token_lifetime=3600)
    return box


def test_one_token_request_per_lifetime_of_one_hour_tokens(hour_tokens):
    requests, least = a_day_of_delegated_use(hour_tokens, MIN_LIFE)
    assert requests == 23  # 24 tokens a day, the first from the sign-in; microsoft_outlook also asks 23 times
    assert least >= MIN_LIFE


def test_msal_alone_asks_every_55_minutes(hour_tokens):
    """The baseline: MSAL's own rule (a token under 5 minutes is expired) asks 26 times a day."""
    requests, least = a_day_of_delegated_use(hour_tokens, None)
    assert requests == 26
    assert least >= 5 * 60


def test_microsofts_60_to_90_minute_tokens_need_fewer(box):
    box.control("settings", access_token_lifetime=3600, access_token_lifetime_max=5400)  # TOK-01
    requests, least = a_day_of_delegated_use(box, MIN_LIFE)
    assert requests <= 23
    assert least >= MIN_LIFE


def test_app_only_asks_once_per_lifetime(hour_tokens):
    client = client_of(hour_tokens)
    scopes = CLOUDS["global"].app_scopes()
    least = float("inf")
    with virtual_clock() as clock:
        for _run in range(DAY // CRON):
            token = client.app_access_token(scopes)
            least = min(least, token.expires_at - clock[0])
            clock[0] += CRON
    assert hour_tokens.counter("token:client_credentials") == 24  # the first one included
    assert least >= MIN_LIFE
