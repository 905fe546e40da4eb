"""Every token request goes through MSAL; this module is the only place that talks to it.

One IdentityClient serves one token cache (one OAuth account, or one app-only registration).
MSAL objects are cheap once the authority's OpenID configuration is known, so the discovery
responses are kept in a process-wide http cache and HTTP sessions are pooled per trust anchor.
"""

import base64
import json
import logging
import re
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import msal
import requests

from . import diagnosis
from .clouds import CLOUDS
from .errors import AuthorizationFailed, ReconnectRequired, TransientFailure
from .i18n import _lt
from .id_token import IdTokenRejected

_logger = logging.getLogger(__name__)


class _RedactGrantCodes(logging.Filter):
    """MSAL's debug log of each token event masks tokens and secrets but shows the authorization
    code and the PKCE verifier: mask those too, so debug logs stay shareable."""

    _PATTERN = re.compile(r'("(?:code|code_verifier)": ")[^"]+(")')

    def filter(self, record):
        message = record.getMessage()
        if '"code' in message:
            record.msg, record.args = self._PATTERN.sub(r"\1********\2", message), ()
        return True


logging.getLogger("msal.token_cache").addFilter(_RedactGrantCodes())

# A token is handed out only with at least this many seconds left: enough for the login of the
# connection that uses it, after the slowest retried request (_TimeoutSession.BUDGET). MSAL alone
# would refresh 5 minutes before expiry (msal 1.39 application.py: `expires_in < 5*60`), one extra
# token request every 55 minutes; with this margin it is one per token lifetime.
MIN_LIFE = 150

# MSAL caches discovery GETs (24 h) and error/Retry-After answers here; sharing it across clients
# avoids one openid-configuration request per connection.
_HTTP_CACHE = {}
_SESSIONS = {}
_SESSIONS_LOCK = threading.Lock()


@dataclass(frozen=True)
class AppCredentials:
    """What MSAL needs to act for one app registration."""

    client_id: str
    authority: str  # https://<sign-in host>/<tenant>
    client_secret: str = None
    certificate: dict = None  # {"private_key": PEM, "public_certificate": PEM}: PS256 with x5t#S256
    ca_file: str = None  # trust anchor of a private authority (the sandbox, a TLS-inspecting proxy)
    timeout: float = 10.0  # per request; retries are bounded too (_TimeoutSession)

    def __repr__(self):  # never show the secret or key, not even in a traceback's locals
        return f"AppCredentials(client_id={self.client_id!r}, authority={self.authority!r})"

    @property
    def credential(self):
        return self.certificate or self.client_secret


@dataclass(frozen=True)
class AccessToken:
    token: str
    expires_at: float  # epoch seconds
    from_cache: bool

    def __repr__(self):
        return f"AccessToken(expires_at={self.expires_at}, from_cache={self.from_cache})"


@dataclass(frozen=True)
class SignIn:
    """The outcome of a completed authorization-code flow."""

    username: str
    tenant_id: str
    home_account_id: str
    scopes: tuple
    expires_at: float
    access_token: str = field(default="", repr=False)  # to check the mailbox before storing


def http_session(ca_file=None):
    """A pooled session; with a private CA it must not let REQUESTS_CA_BUNDLE override verify."""
    with _SESSIONS_LOCK:
        session = _SESSIONS.get(ca_file)
        if session is None:
            session = requests.Session()
            if ca_file:
                session.trust_env = False
                session.verify = ca_file
                session.proxies = requests.utils.get_environ_proxies("https://")
            _SESSIONS[ca_file] = session
        return session


class IdentityClient:
    def __init__(self, app, cache_state=None):
        self.app = app
        self.cache = msal.SerializableTokenCache()
        if cache_state:
            self.cache.deserialize(cache_state)
        self._msal = None

    @property
    def msal_app(self):
        if self._msal is None:
            session = http_session(self.app.ca_file)
            try:
                self._msal = msal.ConfidentialClientApplication(
                    self.app.client_id,
                    client_credential=self.app.credential,
                    authority=self.app.authority,
                    token_cache=self.cache,
                    http_client=_TimeoutSession(session, self.app.timeout),
                    http_cache=_HTTP_CACHE,
                    # Instance discovery asks login.microsoftonline.com about the authority:
                    # right for Microsoft's clouds, impossible for a private (sandbox) authority.
                    instance_discovery=None if _is_microsoft_authority(self.app.authority) else False,
                )
            except ValueError as exc:
                # MSAL reports an unknown tenant or a refused discovery as a ValueError without
                # Microsoft's answer: ask for it, to say which (AADSTS90002 for an unknown tenant).
                raise AuthorizationFailed(
                    diagnosis.diagnose_oauth(
                        self._discovery_error(session) or {"error": "invalid_request", "error_description": str(exc)},
                    )
                ) from None
            except requests.RequestException as exc:
                raise TransientFailure(diagnosis.diagnose_transport(exc)) from None
        return self._msal

    def _discovery_error(self, session):
        try:
            response = session.get(
                f"{self.app.authority}/v2.0/.well-known/openid-configuration", timeout=self.app.timeout
            )
            answer = response.json()
        except (requests.RequestException, ValueError):
            return None
        return answer if isinstance(answer, dict) and answer.get("error") else None

    def changed_cache_state(self):
        """The serialized cache if MSAL changed it since the last call, else None."""
        if self.cache.has_state_changed:
            self.cache.has_state_changed = False
            return self.cache.serialize()
        return None

    # Delegated (user) flow ------------------------------------------------------------------

    def start_sign_in(self, redirect_uri, scopes, login_hint=None):
        """The auth-code flow with PKCE, state and nonce; keep the returned dict server-side."""
        return self._call(
            lambda: self.msal_app.initiate_auth_code_flow(
                scopes,
                redirect_uri=redirect_uri,
                login_hint=login_hint or None,
                prompt="select_account",
                response_mode="form_post",
            )
        )

    def finish_sign_in(self, flow, params):
        """Redeem the callback's parameters; raises AuthorizationFailed with a diagnosis."""
        result = self._call(lambda: self.msal_app.acquire_token_by_auth_code_flow(dict(flow), dict(params)))
        self._raise_for(result, redirect_uri=flow.get("redirect_uri", ""))
        return self._sign_in_from(result)

    def finish_login(self, flow, params):
        """Redeem a sign-in to Odoo (scopes id_token.SIGNIN_SCOPES); the raw ID token, which MSAL
        does not validate: m365.id_token.validate_id_token does. Raises ValueError (MSAL) when the
        answer does not belong to the flow (state), IdTokenRejected when its nonce differs."""
        try:
            result = self._call(lambda: self.msal_app.acquire_token_by_auth_code_flow(dict(flow), dict(params)))
        except RuntimeError as exc:  # MSAL's own nonce check (SIGNIN-08)
            if "nonce" not in str(exc):
                raise
            raise IdTokenRejected(
                "nonce", _lt("The ID token belongs to another sign-in (its nonce differs): refused.")
            ) from None
        self._raise_for(result, redirect_uri=flow.get("redirect_uri", ""))
        if not result.get("id_token"):
            raise IdTokenRejected("malformed", _lt("Microsoft's answer carries no readable ID token."))
        return result["id_token"]

    def import_refresh_token(self, refresh_token, scopes):
        """Adopt a refresh token obtained elsewhere (another OAuth module) so nobody signs in again;
        MSAL redeems it once and keeps the rotated one in this cache."""
        result = self._call(lambda: self.msal_app.acquire_token_by_refresh_token(refresh_token, scopes))
        self._raise_for(result)
        return self._sign_in_from(result)

    def _sign_in_from(self, result):
        claims = result.get("id_token_claims") or {}
        accounts = self.msal_app.get_accounts()
        home_account_id = next(
            (
                a["home_account_id"]
                for a in accounts
                if a.get("username", "").lower() == (claims.get("preferred_username") or "").lower()
            ),
            accounts[0]["home_account_id"] if accounts else "",
        )
        return SignIn(
            username=(claims.get("preferred_username") or claims.get("upn") or "").lower(),
            tenant_id=claims.get("tid", ""),
            home_account_id=home_account_id,
            scopes=tuple((result.get("scope") or "").split()),
            expires_at=time.time() + int(result.get("expires_in", 0)),
            access_token=result.get("access_token", ""),
        )

    def access_token(self, scopes, home_account_id=None, force_refresh=False, min_life=MIN_LIFE):
        """A valid access token with at least `min_life` seconds left, from the cache or by
        refreshing (rotating the refresh token); `force_refresh` redeems the refresh token anyway
        (keeps an idle grant alive). `min_life=None`: MSAL's own rule (5 minutes)."""
        accounts = self.msal_app.get_accounts()
        account = (
            next((a for a in accounts if a["home_account_id"] == home_account_id), None)
            if home_account_id
            else (accounts[0] if accounts else None)
        )
        if account is None:
            raise ReconnectRequired(
                diagnosis.diagnose_oauth(
                    {"error": "invalid_grant", "error_description": "AADSTS70008: no sign-in is stored."}
                )
            )
        if not force_refresh:
            cached = self._cached_access_token(scopes, account["home_account_id"], min_life)
            if cached is not None:
                return cached
        result = self._call(
            lambda: self.msal_app.acquire_token_silent_with_error(scopes, account, force_refresh=force_refresh)
        )
        if result is None:  # nothing usable in the cache at all
            raise ReconnectRequired(
                diagnosis.diagnose_oauth(
                    {"error": "invalid_grant", "error_description": "AADSTS70008: no refresh token is stored."}
                )
            )
        self._raise_for(result)
        return _access_token(result)

    def cached_access_token(self, scopes, home_account_id=None, margin=330):
        """The cached access token for `scopes` with more than `margin` seconds left, else None; no
        network, nothing refreshed (a refresh spends the refresh token: do it under the row lock)."""
        query = {"home_account_id": home_account_id} if home_account_id else None
        now = time.time()
        for entry in self.cache.search(msal.TokenCache.CredentialType.ACCESS_TOKEN, target=list(scopes), query=query):
            expires_on = int(entry.get("expires_on") or 0)
            if expires_on - now > margin:
                return AccessToken(token=entry["secret"], expires_at=expires_on, from_cache=True)
        return None

    def forget(self):
        """Drop every token of this cache. Microsoft has no per-token revocation endpoint."""
        for account in self.msal_app.get_accounts():
            self.msal_app.remove_account(account)

    # App-only flow --------------------------------------------------------------------------

    def app_access_token(self, scopes, min_life=MIN_LIFE):
        cached = self._cached_access_token(scopes, None, min_life)
        if cached is not None:
            return cached
        result = self._call(lambda: self.msal_app.acquire_token_for_client(scopes))
        self._raise_for(result)
        return _access_token(result)

    def _cached_access_token(self, scopes, home_account_id, min_life):
        """The cached access token MSAL would refresh although it has `min_life` seconds left (it
        refreshes under 5 minutes); None where MSAL decides (more than 5 minutes left, a token
        Microsoft asked to refresh early with refresh_in, none cached)."""
        if min_life is None:
            return None
        authority = self.msal_app.authority
        now = time.time()
        for entry in self.cache.search(
            self.cache.CredentialType.ACCESS_TOKEN,
            target=scopes,
            query={
                "client_id": self.app.client_id,
                "environment": authority.instance,
                "realm": authority.tenant,
                "home_account_id": home_account_id,
            },
        ):
            left = int(entry["expires_on"]) - now
            if left >= 5 * 60 or left < min_life or int(entry.get("refresh_on") or now + 1) <= now:
                continue
            return AccessToken(token=entry["secret"], expires_at=int(entry["expires_on"]), from_cache=True)
        return None

    # ----------------------------------------------------------------------------------------

    def _call(self, function):
        try:
            return function()
        except requests.RequestException as exc:
            raise TransientFailure(diagnosis.diagnose_transport(exc)) from None
        except msal.exceptions.MsalServiceError as exc:  # MSAL raises on 5xx answers
            raise TransientFailure(diagnosis.diagnose_unavailable(exc)) from None

    @staticmethod
    def _raise_for(result, **params):
        if "error" not in result:
            return
        found = diagnosis.diagnose_oauth(result, **params)
        _logger.info("Microsoft identity platform refused a token request: %s", found.code)
        if found.needs_reconnect:
            raise ReconnectRequired(found)
        if found.transient:
            raise TransientFailure(found)
        raise AuthorizationFailed(found)


def unverified_claims(access_token):
    """The claims of a JWT access token, unverified: only to explain a refusal (which roles an
    app-only token carries), never to trust it."""
    try:
        payload = access_token.split(".")[1]
        return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError, AttributeError):
        return {}


def _is_microsoft_authority(authority):
    host = urlsplit(authority).hostname or ""
    return any(host == urlsplit(cloud.authority_host).hostname for cloud in CLOUDS.values())


def _access_token(result):
    return AccessToken(
        token=result["access_token"],
        expires_at=time.time() + int(result.get("expires_in", 0)),
        from_cache=result.get("token_source") == "cache",
    )


class _TimeoutSession:
    """The HTTP client MSAL uses: pooled, with bounded timeouts, and patient with a busy identity
    platform: 429 and 5xx answers and timeouts are retried a few times, honouring Retry-After, so
    that one slow moment does not fail a fetch; what still fails is reported as transient.

    Bounded: at most ATTEMPTS requests within BUDGET seconds (waits and timeouts together). MSAL
    itself does not retry (msal 1.39 throttled_http_client.py only replays a 429/5xx answer from its
    cache for Retry-After seconds, per account): nothing is retried twice. Once the retries are spent,
    the same endpoint is answered at once for the Retry-After Microsoft asked (else PAUSE seconds
    after timeouts), so that a cron going over hundreds of accounts during an outage does not wait
    out every one of them."""

    RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
    ATTEMPTS = 3
    MAX_WAIT = 10.0  # seconds; a longer Retry-After is left to MSAL (it answers from its throttle cache)
    BUDGET = 15.0  # seconds for all attempts of one request, timeouts and waits included
    PAUSE = 30.0  # seconds an endpoint that timed out every attempt is left alone
    _unavailable = {}  # url: (until, response or exception type), process-wide
    _unavailable_lock = threading.Lock()

    def __init__(self, session, timeout, sleep=time.sleep, clock=time.monotonic):
        self._session = session
        self._timeout = timeout
        self._sleep = sleep
        self._clock = clock

    def get(self, url, **kwargs):
        return self._send(self._session.get, url, **kwargs)

    def post(self, url, **kwargs):
        return self._send(self._session.post, url, **kwargs)

    def _send(self, method, url, **kwargs):
        paused = self._paused(url)
        if paused is not None:
            if isinstance(paused, type):
                raise paused(f"{url} is left alone for a moment after failing repeatedly")
            return paused
        timeout = kwargs.pop("timeout", self._timeout)
        deadline = self._clock() + self.BUDGET
        for attempt in range(1, self.ATTEMPTS + 1):
            left = deadline - self._clock()
            last = attempt == self.ATTEMPTS or left < 1.0
            try:
                response = method(url, timeout=_bounded(timeout, left), **kwargs)
            except (requests.Timeout, requests.ConnectionError) as exc:
                wait = _backoff(attempt)
                if last or self._clock() + wait >= deadline:
                    self._pause(url, self.PAUSE, type(exc))
                    raise
                _logger.info("Microsoft identity platform did not answer (attempt %s); retrying", attempt)
                self._sleep(wait)
                continue
            if response.status_code not in self.RETRY_STATUSES:
                return response
            wait = _retry_after(response, default=_backoff(attempt))
            if last or wait > self.MAX_WAIT or self._clock() + wait >= deadline:
                self._pause(url, min(_retry_after(response, default=0.0), 300.0), response)
                return response
            _logger.info("Microsoft identity platform answered %s; retrying in %.1f s", response.status_code, wait)
            self._sleep(wait)
        return response

    def _paused(self, url):
        with self._unavailable_lock:
            until, answer = self._unavailable.get(url, (0.0, None))
            if until > self._clock():
                return answer
            self._unavailable.pop(url, None)
            return None

    def _pause(self, url, seconds, answer):
        if seconds > 0:
            with self._unavailable_lock:
                self._unavailable[url] = (self._clock() + seconds, answer)

    def close(self):
        pass  # the pooled session outlives this client


def _bounded(timeout, left):
    """The request's timeout within what is left of the budget (requests takes a number or a pair)."""
    left = max(left, 1.0)
    if isinstance(timeout, tuple):
        return tuple(min(part, left) if part else left for part in timeout)
    return min(timeout, left) if timeout else left


def _backoff(attempt):
    return min(0.5 * 2 ** (attempt - 1), 4.0)


def _retry_after(response, default):
    try:
        return max(0.0, float(response.headers.get("Retry-After", "")))
    except ValueError:
        return default
