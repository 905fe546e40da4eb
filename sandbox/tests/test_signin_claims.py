"""What the sandbox's ID tokens say about a person signing in (CONFORMANCE SIGNIN-01 to SIGNIN-08):
stable oid and tid, a mutable email claim, guests, keys per tenant, the multi-tenant issuer."""

import jwt
import pytest
from test_identity_endpoint import msal_app, session_for

SIGNIN_REDIRECT_URI = "http://localhost:8069/microsoft365/signin/callback"
PARTNER = "Partner Mail (multi-tenant)"


def sign_in(sandbox, app_name, account, tenant=None, scopes=("email",)):
    """MSAL's auth-code flow with the sign-in scopes; the redeemed result and the raw id_token's claims."""
    client = sandbox.app(app_name)["client_id"]
    sandbox.control("add_redirect_uri", client_id=client, redirect_uri=SIGNIN_REDIRECT_URI)
    app = msal_app(sandbox, app_name=app_name, tenant=tenant)
    flow = app.initiate_auth_code_flow(
        list(scopes), redirect_uri=SIGNIN_REDIRECT_URI, prompt="select_account", response_mode="form_post"
    )
    params = sandbox.sign_in(flow["auth_uri"], account)
    result = app.acquire_token_by_auth_code_flow(flow, params)
    assert "id_token" in result, result
    return result, jwt.decode(result["id_token"], options={"verify_signature": False})


def test_a_member_has_stable_oid_and_tid_and_the_email_claim_only_when_asked(fresh):
    contoso = fresh.tenant()["id"]
    _, claims = sign_in(fresh, "Odoo Mail (sandbox)", "alice@contoso.com")
    assert claims["oid"] == fresh.user("alice@contoso.com")["oid"]
    assert claims["tid"] == contoso
    assert claims["iss"] == f"{fresh.identity_url}/{contoso}/v2.0"
    assert claims["email"] == "alice@contoso.com"
    assert claims["preferred_username"] == "alice@contoso.com"
    assert "upn" not in claims and "idp" not in claims  # v2.0 ID tokens: upn is an optional claim
    assert {"iat", "nbf", "exp", "nonce", "aud", "sub", "name"} <= set(claims)
    _, without_email = sign_in(fresh, "Odoo Mail (sandbox)", "alice@contoso.com", scopes=())
    assert "email" not in without_email


def test_a_tenant_can_set_any_address_as_its_users_email_claim(fresh):
    """nOAuth: Fabrikam's administrator gives Mallory (no mailbox) Alice's address."""
    fresh.control("user_attributes", user="mallory@fabrikam.onmicrosoft.com", email="alice@contoso.com")
    _, claims = sign_in(fresh, PARTNER, "mallory@fabrikam.onmicrosoft.com", tenant="organizations")
    assert claims["email"] == "alice@contoso.com"
    assert claims["tid"] == fresh.tenant("Fabrikam")["id"]
    assert claims["oid"] == fresh.user("mallory@fabrikam.onmicrosoft.com")["oid"]
    assert claims["oid"] != fresh.user("alice@contoso.com")["oid"]
    assert claims["iss"] == f"{fresh.identity_url}/{claims['tid']}/v2.0"


def test_a_guest_is_an_object_of_the_inviting_tenant_authenticated_by_its_home_tenant(fresh):
    guest = next(u for u in fresh.description["directory"]["users"] if u["home_tenant"])
    assert "#EXT#" in guest["upn"]
    _, claims = sign_in(fresh, "Odoo Mail (sandbox)", guest["upn"])
    fabrikam, contoso = fresh.tenant("Fabrikam")["id"], fresh.tenant()["id"]
    assert claims["tid"] == contoso and claims["oid"] == guest["oid"]
    assert claims["oid"] != fresh.user("carol@fabrikam.onmicrosoft.com")["oid"]  # another object than at home
    assert claims["idp"] == f"https://sts.windows.net/{fabrikam}/"
    assert claims["preferred_username"] == "carol@fabrikam.onmicrosoft.com"
    assert claims["email"] == "carol@fabrikam.onmicrosoft.com"
    assert "upn" not in claims


def test_keys_name_their_issuer_per_tenant_and_the_template_on_organizations(fresh):
    http = session_for(fresh)
    contoso = fresh.tenant()["id"]
    tenant_keys = http.get(f"{fresh.identity_url}/{contoso}/discovery/v2.0/keys").json()["keys"]
    assert {k["issuer"] for k in tenant_keys} == {f"{fresh.identity_url}/{contoso}/v2.0"}
    for alias in ("organizations", "common"):
        config = http.get(f"{fresh.identity_url}/{alias}/v2.0/.well-known/openid-configuration").json()
        assert config["issuer"] == f"{fresh.identity_url}/{{tenantid}}/v2.0"
        keys = http.get(config["jwks_uri"]).json()["keys"]
        assert {k["issuer"] for k in keys} == {f"{fresh.identity_url}/{{tenantid}}/v2.0"}
    unknown = http.get(f"{fresh.identity_url}/nosuchtenant.example/discovery/v2.0/keys")
    assert unknown.status_code == 400 and unknown.json()["error_codes"] == [90002]


@pytest.mark.parametrize(
    "kind, check",
    [
        ("audience", lambda c, box: c["aud"] != box.app()["client_id"]),
        ("issuer", lambda c, box: c["iss"] != f"{box.identity_url}/{c['tid']}/v2.0"),
        ("tenant", lambda c, box: c["tid"] == box.tenant("Fabrikam")["id"] and c["iss"].endswith(f"/{c['tid']}/v2.0")),
        ("expired", lambda c, box: c["exp"] < c["iat"] + 7200 and c["exp"] < __import__("time").time()),
        ("not_yet_valid", lambda c, box: c["nbf"] > __import__("time").time()),
    ],
)
def test_id_token_faults_spoil_one_sign_in(fresh, kind, check):
    fresh.control("id_token_fault", kind=kind)
    _, spoilt = sign_in(fresh, "Odoo Mail (sandbox)", "alice@contoso.com")
    assert check(spoilt, fresh)
    _, next_one = sign_in(fresh, "Odoo Mail (sandbox)", "alice@contoso.com")
    assert next_one["aud"] == fresh.app()["client_id"] and next_one["tid"] == fresh.tenant()["id"]


def test_signature_fault_is_a_token_the_published_keys_do_not_verify(fresh):
    fresh.control("id_token_fault", kind="signature")
    result, claims = sign_in(fresh, "Odoo Mail (sandbox)", "alice@contoso.com")
    keys = session_for(fresh).get(f"{fresh.identity_url}/{claims['tid']}/discovery/v2.0/keys").json()["keys"]
    key = jwt.PyJWK(keys[0]).key
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(result["id_token"], key, algorithms=["RS256"], audience=claims["aud"])
