"""ID token validation for sign-in to Odoo (m365/id_token.py): one test per check, each of which fails
when that check is removed, and the whole path against the sandbox with MSAL."""

import base64
import json
import time
import uuid

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from m365.id_token import (
    SIGNIN_SCOPES,
    IdTokenRejected,
    KeyDirectory,
    SignInIdentity,
    nonce_hash,
    validate_id_token,
)
from m365.identity import AppCredentials, IdentityClient, http_session

SANDBOX_WITH_MAIL = False
HOST = "https://login.example"
TENANT = str(uuid.uuid5(uuid.NAMESPACE_URL, "tenant-a"))
OTHER_TENANT = str(uuid.uuid5(uuid.NAMESPACE_URL, "tenant-b"))
CLIENT = str(uuid.uuid5(uuid.NAMESPACE_URL, "client"))
OID = str(uuid.uuid5(uuid.NAMESPACE_URL, "user"))
NONCE = "flow-nonce-123"
KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _b64(number):
    return base64.urlsafe_b64encode(number.to_bytes((number.bit_length() + 7) // 8, "big")).rstrip(b"=").decode()


def jwk(key, kid="k1", issuer=None):
    numbers = key.public_key().public_numbers()
    found = {"kty": "RSA", "use": "sig", "kid": kid, "n": _b64(numbers.n), "e": _b64(numbers.e)}
    if issuer:
        found["issuer"] = issuer
    return found


class Keys:
    """A KeyDirectory stand-in: a discovery issuer and the published keys."""

    def __init__(self, issuer=f"{HOST}/{{tenantid}}/v2.0", keys=None):
        self._issuer = issuer
        self.keys = {k["kid"]: k for k in (keys or [jwk(KEY, issuer=issuer)])}

    def issuer(self):
        return self._issuer

    def signing_key(self, kid):
        return self.keys.get(kid)


def token(key=KEY, kid="k1", alg="RS256", **overrides):
    now = int(time.time())
    claims = {
        "aud": CLIENT,
        "iss": f"{HOST}/{TENANT}/v2.0",
        "tid": TENANT,
        "oid": OID,
        "sub": "pairwise",
        "preferred_username": "alice@contoso.com",
        "name": "Alice",
        "email": "alice@contoso.com",
        "nonce": nonce_hash(NONCE),
        "iat": now,
        "nbf": now,
        "exp": now + 3600,
        "ver": "2.0",
    }
    claims.update(overrides)
    claims = {k: v for k, v in claims.items() if v is not None}
    return jwt.encode(claims, key, algorithm=alg, headers={"kid": kid})


def validate(id_token, keys=None, allowed=frozenset({TENANT}), **kwargs):
    return validate_id_token(
        id_token,
        keys=keys or Keys(),
        client_id=CLIENT,
        nonce=kwargs.pop("nonce", NONCE),
        allowed_tenants=allowed,
        **kwargs,
    )


def rejected(reason, id_token, **kwargs):
    with pytest.raises(IdTokenRejected) as caught:
        validate(id_token, **kwargs)
    assert caught.value.reason == reason, caught.value
    return caught.value


def test_a_good_token_gives_tid_and_oid_and_display_claims():
    identity = validate(token())
    assert identity == SignInIdentity(
        tenant_id=TENANT,
        object_id=OID,
        username="alice@contoso.com",
        name="Alice",
        email="alice@contoso.com",
        identity_provider="",
    )
    assert not identity.is_guest


def test_a_guest_is_recognised_by_idp():
    identity = validate(token(idp=f"https://sts.windows.net/{OTHER_TENANT}/"))
    assert identity.is_guest and identity.tenant_id == TENANT


def test_single_tenant_issuer_must_match_exactly():
    keys = Keys(issuer=f"{HOST}/{TENANT}/v2.0")
    assert validate(token(), keys=keys).tenant_id == TENANT
    # A tid that is not the single tenant's, under that tenant's issuer
    rejected("issuer", token(tid=OTHER_TENANT), keys=keys, allowed=None)
    # Another tenant's consistent token does not match a single-tenant issuer.
    rejected("issuer", token(iss=f"{HOST}/{OTHER_TENANT}/v2.0", tid=OTHER_TENANT), keys=keys, allowed=None)


def test_multi_tenant_issuer_template_is_resolved_with_tid():
    rejected("issuer", token(iss=f"{HOST}/{OTHER_TENANT}/v2.0"))  # tid says TENANT
    rejected("issuer", token(iss=f"{HOST}/{{tenantid}}/v2.0"))
    rejected("issuer", token(iss=f"https://evil.example/{TENANT}/v2.0"))


def test_the_signing_keys_own_issuer_is_checked():
    keys = Keys(keys=[jwk(KEY, issuer=f"{HOST}/{OTHER_TENANT}/v2.0")])
    rejected("issuer", token(), keys=keys)


def test_tid_must_be_a_guid():
    rejected("tenant", token(tid="contoso.com", iss=f"{HOST}/contoso.com/v2.0"))
    rejected("tenant", token(tid=None))


def test_audience_must_be_this_client():
    error = rejected("audience", token(aud=str(uuid.uuid4())))
    assert "another application" in str(error)
    rejected("audience", token(aud=[CLIENT, str(uuid.uuid4())]))


def test_nonce_must_be_this_flows():
    rejected("nonce", token(nonce=nonce_hash("another flow")))
    rejected("nonce", token(nonce=None))
    rejected("nonce", token(nonce=NONCE))  # the raw nonce is not what Microsoft echoes: its SHA-256 is


def test_expired_and_not_yet_valid_tokens_with_five_minutes_of_skew():
    now = time.time()
    rejected("expired", token(iat=int(now) - 7200, nbf=int(now) - 7200, exp=int(now) - 301))
    assert validate(token(iat=int(now) - 7200, nbf=int(now) - 7200, exp=int(now) - 200))  # within skew
    rejected("not_yet_valid", token(nbf=int(now) + 400))
    rejected("not_yet_valid", token(iat=int(now) + 400, nbf=int(now)))
    assert validate(token(iat=int(now) + 200, nbf=int(now) + 200))
    rejected("malformed", token(exp=None))


def test_tenant_outside_the_allow_list_is_refused_and_none_means_any():
    other = token(tid=OTHER_TENANT, iss=f"{HOST}/{OTHER_TENANT}/v2.0")
    error = rejected("tenant_not_allowed", other)
    assert OTHER_TENANT in str(error)
    assert validate(other, allowed=None).tenant_id == OTHER_TENANT
    assert validate(other, allowed={TENANT, OTHER_TENANT.upper()}).tenant_id == OTHER_TENANT


def test_signature_by_an_unpublished_key_is_refused():
    rejected("signature", token(key=OTHER_KEY))
    # a payload changed after signing
    header, payload, signature = token().split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["oid"] = str(uuid.uuid4())
    forged_payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    rejected("signature", f"{header}.{forged_payload}.{signature}")


def test_unknown_key_id_none_and_symmetric_algorithms_are_refused():
    rejected("unknown_key", token(kid="not-published"))
    unsigned = jwt.encode({"tid": TENANT}, None, algorithm="none", headers={"kid": "k1"})
    rejected("algorithm", unsigned)
    hmac_signed = jwt.encode(
        {"tid": TENANT}, "a-secret-of-thirty-two-bytes-or-more!!", algorithm="HS256", headers={"kid": "k1"}
    )
    rejected("algorithm", hmac_signed)


def test_garbage_is_malformed_and_oid_is_required():
    for garbage in ("", "a.b", "a.b.c", None, "....", "e30.e30.e30"):
        with pytest.raises(IdTokenRejected):
            validate(garbage)
    rejected("malformed", token(oid=None))


# Against the sandbox: discovery, keys, MSAL ---------------------------------------------------------

REDIRECT_URI = "http://localhost:8069/microsoft365/signin/callback"


def sandbox_client(box, app_name="Odoo Mail (sandbox)", tenant=None):
    app = box.app(app_name)
    box.control("add_redirect_uri", client_id=app["client_id"], redirect_uri=REDIRECT_URI)
    credentials = AppCredentials(
        client_id=app["client_id"],
        authority=box.authority(tenant),
        client_secret=box.secret(app_name),
        ca_file=box.ca_file,
    )
    return IdentityClient(credentials), credentials


def sign_in(box, account, app_name="Odoo Mail (sandbox)", tenant=None):
    client, credentials = sandbox_client(box, app_name, tenant)
    flow = client.start_sign_in(REDIRECT_URI, list(SIGNIN_SCOPES), login_hint=account)
    params = box.sign_in(flow["auth_uri"], account)
    id_token = client.finish_login(flow, params)
    keys = KeyDirectory(credentials.authority, http_session(box.ca_file), ca_file=box.ca_file)
    return id_token, keys, flow, credentials


def test_sandbox_sign_in_validates_with_the_tenants_keys(box):
    KeyDirectory.forget_all()
    id_token, keys, flow, credentials = sign_in(box, "alice@contoso.com")
    contoso = box.tenant()["id"]
    identity = validate_id_token(
        id_token, keys=keys, client_id=credentials.client_id, nonce=flow["nonce"], allowed_tenants={contoso}
    )
    assert (identity.tenant_id, identity.object_id) == (contoso, box.user("alice@contoso.com")["oid"])
    assert "prompt=select_account" in flow["auth_uri"] and "login_hint=alice" in flow["auth_uri"]
    assert "email" in flow["auth_uri"]
    before = box.counter("openid_configuration")
    validate_id_token(
        id_token, keys=keys, client_id=credentials.client_id, nonce=flow["nonce"], allowed_tenants={contoso}
    )
    assert box.counter("openid_configuration") == before  # discovery and keys are cached


def test_nOAuth_another_tenants_user_with_the_victims_email_stays_herself(box):
    KeyDirectory.forget_all()
    box.control("user_attributes", user="mallory@fabrikam.onmicrosoft.com", email="alice@contoso.com")
    id_token, keys, flow, credentials = sign_in(
        box, "mallory@fabrikam.onmicrosoft.com", app_name="Partner Mail (multi-tenant)", tenant="organizations"
    )
    fabrikam = box.tenant("Fabrikam")["id"]
    identity = validate_id_token(
        id_token, keys=keys, client_id=credentials.client_id, nonce=flow["nonce"], allowed_tenants=None
    )
    assert identity.email == "alice@contoso.com"
    assert (identity.tenant_id, identity.object_id) == (fabrikam, box.user("mallory@fabrikam.onmicrosoft.com")["oid"])
    with pytest.raises(IdTokenRejected) as caught:
        validate_id_token(
            id_token,
            keys=keys,
            client_id=credentials.client_id,
            nonce=flow["nonce"],
            allowed_tenants={box.tenant()["id"]},
        )
    assert caught.value.reason == "tenant_not_allowed"


@pytest.mark.parametrize(
    "fault, reason",
    [
        ("audience", "audience"),
        ("issuer", "issuer"),
        ("tenant", "issuer"),  # a single-tenant authority's issuer names Contoso only
        ("expired", "expired"),
        ("not_yet_valid", "not_yet_valid"),
        ("signature", "signature"),
        ("unsigned", "algorithm"),
    ],
)
def test_sandbox_id_token_faults_are_refused(box, fault, reason):
    box.control("id_token_fault", kind=fault)
    id_token, keys, flow, credentials = sign_in(box, "alice@contoso.com")
    with pytest.raises(IdTokenRejected) as caught:
        validate_id_token(
            id_token,
            keys=keys,
            client_id=credentials.client_id,
            nonce=flow["nonce"],
            allowed_tenants={box.tenant()["id"]},
        )
    assert caught.value.reason == reason


def test_msal_refuses_a_wrong_nonce_before_we_see_it(box):
    box.control("id_token_fault", kind="nonce")
    with pytest.raises(IdTokenRejected) as caught:
        sign_in(box, "alice@contoso.com")
    assert caught.value.reason == "nonce"


def test_unknown_kid_fetches_the_keys_again_at_most_every_five_minutes(box):
    KeyDirectory.forget_all()
    clock = [1000.0]
    keys = KeyDirectory(box.authority(), http_session(box.ca_file), ca_file=box.ca_file, clock=lambda: clock[0])
    real_kid = next(iter(keys._entry()["keys"]))
    before = box.counter("openid_configuration")
    assert keys.signing_key("rotated-away") is None
    assert box.counter("openid_configuration") == before  # fetched a moment ago: not again
    clock[0] += 301
    assert keys.signing_key("rotated-away") is None
    assert box.counter("openid_configuration") == before + 1
    assert keys.signing_key(real_kid)
    clock[0] += 24 * 3600
    keys.issuer()
    assert box.counter("openid_configuration") == before + 2  # a day later: fetched again
