"""Sign-in to Odoo with Microsoft: the ID token of an authorization-code flow, validated fully.

MSAL (1.38 and later) only decodes ID tokens and checks the nonce (sandbox/CONFORMANCE.md SIGNIN-08),
so everything a web app must check is checked here, with `cryptography` alone: the RS256 signature
against the keys the authority's discovery document publishes (cached for a day, fetched again for an
unknown key id), the issuer of the tenant (the multi-tenant `{tenantid}` template resolved with `tid`),
the signing key's own issuer, the audience, the nonce, `exp`/`nbf`/`iat` with a small clock skew, and
the tenant against an allow-list (SIGNIN-05 to SIGNIN-07).

The person is identified by `tid` + `oid` only (SIGNIN-01); `email`, `preferred_username` and `name`
are for display (SIGNIN-02, SIGNIN-03).
"""

import base64
import hashlib
import hmac
import json
import re
import threading
import time
from dataclasses import dataclass

import requests
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from . import diagnosis
from .errors import AuthorizationFailed, M365Error, TransientFailure
from .i18n import _lt

# Only the OpenID Connect scopes: MSAL adds openid, profile and offline_access itself (and refuses
# them as input); `email` brings the email claim, used for display only.
SIGNIN_SCOPES = ("email",)
CLOCK_SKEW = 300  # seconds, either way
KEYS_LIFETIME = 24 * 3600  # Microsoft: check for new keys about every 24 hours (SIGNIN-05)
KEYS_REFETCH_AFTER = 300  # an unknown key id fetches the keys again, at most this often
GUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
TENANT_TEMPLATE = "{tenantid}"


class IdTokenRejected(M365Error):
    """The ID token is not one this app may accept; ``reason`` names the check that refused it."""

    def __init__(self, reason, message, **params):
        self.reason = reason
        super().__init__(message, **params)


@dataclass(frozen=True)
class SignInIdentity:
    """Who signed in: ``tenant_id`` + ``object_id`` identify; the rest is for display."""

    tenant_id: str
    object_id: str
    username: str  # preferred_username: mutable, display only
    name: str
    email: str  # the Mail attribute: unverified, mutable, display only
    identity_provider: str  # `idp`: set for guests (their home tenant)

    @property
    def is_guest(self):
        """Authenticated by another tenant than the one it signs in to (B2B guest, SIGNIN-04)."""
        return bool(self.identity_provider) and self.tenant_id not in self.identity_provider


def nonce_hash(nonce):
    """What MSAL sends as `nonce` (and Microsoft puts in the ID token) for the flow's nonce."""
    return hashlib.sha256(nonce.encode("ascii")).hexdigest()


def _b64decode(segment):
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def _b64int(value):
    return int.from_bytes(_b64decode(value), "big")


class KeyDirectory:
    """The issuer and signing keys of one authority (https://host/<tenant>), from its v2.0 discovery
    document, cached per process and shared by every request."""

    _cache = {}  # (authority, ca_file) -> {"fetched_at", "issuer", "keys": {kid: jwk}}
    _lock = threading.Lock()

    def __init__(self, authority, session, ca_file=None, timeout=10.0, clock=time.time):
        self.authority = authority.rstrip("/")
        self.session = session
        self.key = (self.authority, ca_file)
        self.timeout = timeout
        self.clock = clock

    def issuer(self):
        return self._entry()["issuer"]

    def signing_key(self, kid):
        """The JWK with this key id; the keys are fetched again (rate-limited) when it is unknown."""
        entry = self._entry()
        found = entry["keys"].get(kid)
        if found is None and self.clock() - entry["fetched_at"] > KEYS_REFETCH_AFTER:
            found = self._entry(refresh=True)["keys"].get(kid)
        return found

    def _entry(self, refresh=False):
        with self._lock:
            entry = self._cache.get(self.key)
        if entry and not refresh and self.clock() - entry["fetched_at"] < KEYS_LIFETIME:
            return entry
        config = self._get(f"{self.authority}/v2.0/.well-known/openid-configuration")
        keys = self._get(config["jwks_uri"]).get("keys") or []
        entry = {
            "fetched_at": self.clock(),
            "issuer": config["issuer"],
            "keys": {k["kid"]: k for k in keys if isinstance(k, dict) and k.get("kid")},
        }
        with self._lock:
            self._cache[self.key] = entry
        return entry

    def _get(self, url):
        try:
            response = self.session.get(url, timeout=self.timeout)
            answer = response.json()
        except requests.RequestException as exc:
            raise TransientFailure(diagnosis.diagnose_transport(exc)) from None
        except ValueError:
            raise IdTokenRejected(
                "keys_unavailable",
                _lt(
                    "Microsoft's sign-in service did not publish its signing keys at %(url)s (the answer is not JSON)."
                ),
                url=url,
            ) from None
        if not isinstance(answer, dict) or answer.get("error"):
            raise AuthorizationFailed(diagnosis.diagnose_oauth(answer if isinstance(answer, dict) else {}))
        if "keys" not in answer and not (answer.get("issuer") and answer.get("jwks_uri")):
            raise IdTokenRejected(
                "keys_unavailable",
                _lt("Microsoft's sign-in service did not publish its issuer and signing keys at %(url)s."),
                url=url,
            )
        return answer

    @classmethod
    def forget_all(cls):
        with cls._lock:
            cls._cache.clear()


def _verify_rs256(jwk, signing_input, signature):
    if jwk.get("kty") != "RSA":
        return False
    try:
        public_key = rsa.RSAPublicNumbers(_b64int(jwk["e"]), _b64int(jwk["n"])).public_key()
        public_key.verify(signature, signing_input, padding.PKCS1v15(), hashes.SHA256())
    except (InvalidSignature, KeyError, ValueError, TypeError):
        return False
    return True


def validate_id_token(id_token, *, keys, client_id, nonce, allowed_tenants, now=None, skew=CLOCK_SKEW):
    """The identity in a Microsoft ID token, or IdTokenRejected naming the check that failed.

    ``nonce`` is the flow's own nonce (MSAL keeps it in the flow; the token carries its SHA-256);
    ``allowed_tenants`` is a set of tenant ids, or None for any tenant (an explicit choice).
    """
    now = time.time() if now is None else now
    try:
        header_segment, payload_segment, signature_segment = (id_token or "").split(".")
        header = json.loads(_b64decode(header_segment))
        claims = json.loads(_b64decode(payload_segment))
        signature = _b64decode(signature_segment)
    except ValueError:
        raise IdTokenRejected("malformed", _lt("Microsoft's answer carries no readable ID token.")) from None
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise IdTokenRejected("malformed", _lt("Microsoft's answer carries no readable ID token."))

    # Signature: RS256 only (never "none", never a symmetric algorithm), by a published key.
    if header.get("alg") != "RS256":
        raise IdTokenRejected(
            "algorithm",
            _lt("The ID token is not signed the way Microsoft signs (algorithm %(alg)s): refused."),
            alg=str(header.get("alg")),
        )
    jwk = keys.signing_key(str(header.get("kid") or ""))
    if jwk is None:
        raise IdTokenRejected(
            "unknown_key",
            _lt("The ID token is signed with a key Microsoft does not publish for this sign-in: refused."),
        )
    if not _verify_rs256(jwk, f"{header_segment}.{payload_segment}".encode("ascii"), signature):
        raise IdTokenRejected("signature", _lt("The signature of the ID token is not valid: refused."))

    # Tenant and issuer: the tenant's own issuer, or the {tenantid} template resolved with tid.
    tenant_id = claims.get("tid")
    if not isinstance(tenant_id, str) or not GUID.fullmatch(tenant_id):
        raise IdTokenRejected("tenant", _lt("The ID token names no valid directory (tenant) ID: refused."))
    issuer = keys.issuer()
    expected_issuer = issuer.replace(TENANT_TEMPLATE, tenant_id)
    if TENANT_TEMPLATE not in issuer and f"/{tenant_id}/" not in f"{issuer}/":
        # A tenant's own issuer names its tenant: a tid that is not in it does not belong to it.
        raise IdTokenRejected(
            "issuer",
            _lt("The ID token was issued by %(issuer)s, not by the directory it names (%(expected)s): refused."),
            issuer=str(claims.get("iss")),
            expected=tenant_id,
        )
    key_issuer = (jwk.get("issuer") or expected_issuer).replace(TENANT_TEMPLATE, tenant_id)
    if claims.get("iss") != expected_issuer or key_issuer != expected_issuer:
        raise IdTokenRejected(
            "issuer",
            _lt("The ID token was issued by %(issuer)s, not by the directory it names (%(expected)s): refused."),
            issuer=str(claims.get("iss")),
            expected=expected_issuer,
        )

    # Audience: this app registration, and nobody else.
    audience = claims.get("aud")
    if not (audience == client_id or (isinstance(audience, list) and audience == [client_id])):
        raise IdTokenRejected(
            "audience",
            _lt(
                "The ID token was issued to another application (%(audience)s), not to this app registration: refused."
            ),
            audience=str(audience),
        )

    # Nonce: this sign-in, not a replay of another one.
    if not nonce or not hmac.compare_digest(str(claims.get("nonce") or ""), nonce_hash(nonce)):
        raise IdTokenRejected("nonce", _lt("The ID token belongs to another sign-in (its nonce differs): refused."))

    # Time: exp, nbf and iat, with a small clock skew.
    try:
        expires, issued = float(claims["exp"]), float(claims["iat"])
        not_before = float(claims.get("nbf", issued))
    except (KeyError, TypeError, ValueError):
        raise IdTokenRejected("malformed", _lt("The ID token carries no validity period: refused.")) from None
    if now - skew >= expires:
        raise IdTokenRejected(
            "expired",
            _lt("The ID token has expired: sign in again. If this repeats, check the clock of the Odoo server."),
        )
    if now + skew < not_before or now + skew < issued:
        raise IdTokenRejected(
            "not_yet_valid",
            _lt("The ID token is not valid yet: check the clock of the Odoo server, then sign in again."),
        )

    if allowed_tenants is not None and tenant_id not in {t.lower() for t in allowed_tenants}:
        raise IdTokenRejected(
            "tenant_not_allowed",
            _lt(
                "Accounts of the directory (tenant) %(tenant)s may not sign in to this Odoo with this app registration."
            ),
            tenant=tenant_id,
        )
    object_id = claims.get("oid")
    if not isinstance(object_id, str) or not GUID.fullmatch(object_id):
        raise IdTokenRejected(
            "malformed", _lt("The ID token carries no object ID (oid) of the user: check the scopes of the sign-in.")
        )
    return SignInIdentity(
        tenant_id=tenant_id,
        object_id=object_id,
        username=str(claims.get("preferred_username") or ""),
        name=str(claims.get("name") or ""),
        email=str(claims.get("email") or ""),
        identity_provider=str(claims.get("idp") or ""),
    )
