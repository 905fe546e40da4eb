"""The core's MSAL wrapper against the sandbox's identity endpoint: retries, faults, diagnosis."""

import tempfile
import time

import pytest
import requests

from m365.clouds import CLOUDS
from m365.errors import ReconnectRequired, TransientFailure
from m365.identity import _HTTP_CACHE, AppCredentials, IdentityClient, _TimeoutSession
from sandbox.client import Sandbox
from sandbox.service import SandboxService

REDIRECT_URI = "http://localhost:8069/microsoft365/oauth/callback"
SCOPES = CLOUDS["global"].delegated_scopes()


@pytest.fixture(scope="module")
def sandbox():
    service = SandboxService(tempfile.mkdtemp(prefix="m365-core-"), ports="auto", with_mail=False).start()
    yield Sandbox(service.description())
    service.stop()


@pytest.fixture
def fresh(sandbox):
    sandbox.reset()
    return sandbox


def credentials(sandbox, timeout=10.0):
    return AppCredentials(
        client_id=sandbox.app()["client_id"],
        authority=sandbox.authority(),
        client_secret=sandbox.secret(),
        ca_file=sandbox.ca_file,
        timeout=timeout,
    )


def signed_in_client(sandbox, timeout=10.0, upn="alice@contoso.com"):
    client = IdentityClient(credentials(sandbox, timeout))
    flow = client.start_sign_in(REDIRECT_URI, SCOPES, login_hint=upn)
    sign_in = client.finish_sign_in(flow, sandbox.sign_in(flow["auth_uri"], upn))
    assert sign_in.username == upn
    return client, sign_in


def test_sign_in_then_cached_token_then_refresh_with_rotation(fresh):
    fresh.control("settings", access_token_lifetime=120)  # under MSAL's 5-minute margin: always refresh
    client, sign_in = signed_in_client(fresh)
    client.changed_cache_state()
    first = client.access_token(SCOPES, sign_in.home_account_id)
    assert client.changed_cache_state()  # the rotated refresh token must be saved
    second = client.access_token(SCOPES, sign_in.home_account_id)
    assert first.token != second.token and not second.from_cache
    assert fresh.counter("token:refresh_token") == 2


def test_throttling_is_waited_out_honouring_retry_after(fresh):
    fresh.control("settings", access_token_lifetime=120)
    client, sign_in = signed_in_client(fresh)
    fresh.control("token_fault", kind="429", count=1, retry_after=1)
    started = time.monotonic()
    token = client.access_token(SCOPES, sign_in.home_account_id)
    assert token.token and time.monotonic() - started >= 1.0
    assert fresh.counter("fault:429") == 1


def test_an_unavailable_identity_platform_is_transient_not_reconnect(fresh):
    fresh.control("settings", access_token_lifetime=120)
    client, sign_in = signed_in_client(fresh)
    fresh.control("token_fault", kind="503", count=5, retry_after=0)
    with pytest.raises(TransientFailure) as failure:
        client.access_token(SCOPES, sign_in.home_account_id)
    assert failure.value.diagnosis.transient
    assert fresh.counter("fault:503") == 3  # bounded: three attempts, then it gives up for this run
    fresh.control("token_fault", kind="none")
    assert client.access_token(SCOPES, sign_in.home_account_id).token  # the grant survived


def test_a_hanging_identity_platform_times_out_and_is_retried(fresh):
    fresh.control("settings", access_token_lifetime=120)
    client, sign_in = signed_in_client(fresh, timeout=0.5)
    fresh.control("token_fault", kind="hang", seconds=1.5, count=1)
    assert client.access_token(SCOPES, sign_in.home_account_id).token
    assert fresh.counter("fault:hang") == 1


def test_a_revoked_grant_needs_reconnect(fresh):
    fresh.control("settings", access_token_lifetime=120)
    client, sign_in = signed_in_client(fresh)
    fresh.control("revoke_sessions", user="alice@contoso.com")
    with pytest.raises(ReconnectRequired) as failure:
        client.access_token(SCOPES, sign_in.home_account_id)
    assert failure.value.diagnosis.code == "AADSTS50173"


@pytest.fixture
def no_pause():
    _TimeoutSession._unavailable.clear()
    yield
    _TimeoutSession._unavailable.clear()  # process-wide: the next test starts with a reachable endpoint


def test_a_long_retry_after_is_reported_at_once_and_the_endpoint_left_alone_meanwhile(fresh, no_pause):
    """Retry-After beyond the retries' budget: transient at once, and during that time the other
    accounts of the cron run are answered without a request (no minutes of waiting, no hammering)."""
    fresh.control("settings", access_token_lifetime=120)
    alice, alice_sign_in = signed_in_client(fresh)
    bob, bob_sign_in = signed_in_client(fresh, upn="bob@contoso.com")
    fresh.control("token_fault", kind="429", count=1, retry_after=60)
    with pytest.raises(TransientFailure) as failure:
        alice.access_token(SCOPES, alice_sign_in.home_account_id)
    assert failure.value.diagnosis.transient and "busy" in str(failure.value.diagnosis.summary)
    assert fresh.counter("fault:429") == 1  # not retried: Microsoft asked for a minute
    requests_before = fresh.counter("token_requests")
    with pytest.raises(TransientFailure):
        bob.access_token(SCOPES, bob_sign_in.home_account_id)
    assert fresh.counter("token_requests") == requests_before  # left alone for the minute asked
    _TimeoutSession._unavailable.clear()  # the minute is over: ours and MSAL's throttle caches forget
    _HTTP_CACHE.clear()
    assert bob.access_token(SCOPES, bob_sign_in.home_account_id).token
    assert alice.access_token(SCOPES, alice_sign_in.home_account_id).token  # both grants survived


def test_retries_stay_within_their_budget_whatever_the_endpoint_does(no_pause):
    """A hanging endpoint: three attempts at most, all within BUDGET seconds (timeouts included)."""
    now = [0.0]
    calls = []

    def hanging(url, timeout, **kwargs):
        calls.append(timeout)
        now[0] += timeout  # the request times out after its timeout
        raise requests.Timeout("read timed out")

    def sleep(seconds):
        now[0] += seconds

    client = _TimeoutSession(None, 10.0, sleep=sleep, clock=lambda: now[0])
    with pytest.raises(requests.Timeout):
        client._send(hanging, "https://login.example/token")
    assert len(calls) <= _TimeoutSession.ATTEMPTS
    assert now[0] <= _TimeoutSession.BUDGET
    with pytest.raises(requests.Timeout):  # the next account: no request while the endpoint is left alone
        client._send(hanging, "https://login.example/token")
    assert len(calls) <= _TimeoutSession.ATTEMPTS
