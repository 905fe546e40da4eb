"""The sandbox's identity endpoint, driven over HTTPS by MSAL itself, as the addon will drive it."""

import hashlib
import time

import jwt
import msal
import pytest
import requests

from sandbox.ca import make_client_certificate

EXCHANGE = "https://outlook.office.com"
SCOPES = [f"{EXCHANGE}/IMAP.AccessAsUser.All", f"{EXCHANGE}/POP.AccessAsUser.All", f"{EXCHANGE}/SMTP.Send"]
REDIRECT_URI = "http://localhost:8069/microsoft365/oauth/callback"
APP_SCOPE = ["https://outlook.office365.com/.default"]


def session_for(sandbox):
    session = requests.Session()
    session.trust_env = False
    session.verify = sandbox.ca_file
    return session


def msal_app(sandbox, client_id=None, credential=None, tenant=None, app_name="Odoo Mail (sandbox)"):
    return msal.ConfidentialClientApplication(
        client_id or sandbox.app(app_name)["client_id"],
        client_credential=credential or sandbox.secret(app_name),
        authority=sandbox.authority(tenant),
        http_client=session_for(sandbox),
        instance_discovery=False,
        token_cache=msal.SerializableTokenCache(),
    )


def claims(token):
    return jwt.decode(token, options={"verify_signature": False})


def sign_in(sandbox, app, account="alice@contoso.com", scopes=SCOPES, **kwargs):
    flow = app.initiate_auth_code_flow(
        scopes, redirect_uri=REDIRECT_URI, login_hint=account, prompt="select_account", response_mode="form_post"
    )
    return flow, sandbox.sign_in(flow["auth_uri"], account, **kwargs)


def assert_microsoft_error(result, code, error=None):
    assert result.get("error_codes") == [code], result
    assert result["error_description"].startswith(f"AADSTS{code}: ")
    assert "Trace ID: " in result["error_description"] and "Correlation ID: " in result["error_description"]
    assert result["trace_id"] and result["correlation_id"] and result["timestamp"]
    if error:
        assert result["error"] == error


# discovery ---------------------------------------------------------------------------------


def test_discovery_by_tenant_id_domain_and_alias(identity_sandbox):
    http = session_for(identity_sandbox)
    tenant = identity_sandbox.tenant()
    for key in (tenant["id"], "contoso.com", "organizations"):
        config = http.get(f"{identity_sandbox.identity_url}/{key}/v2.0/.well-known/openid-configuration").json()
        assert config["token_endpoint"].endswith("/oauth2/v2.0/token")
        assert "form_post" in config["response_modes_supported"]
    by_domain = http.get(f"{identity_sandbox.identity_url}/contoso.com/v2.0/.well-known/openid-configuration").json()
    assert by_domain["issuer"] == f"{identity_sandbox.identity_url}/{tenant['id']}/v2.0"
    keys = http.get(by_domain["jwks_uri"]).json()["keys"]
    assert keys[0]["kty"] == "RSA" and keys[0]["kid"]


def test_unknown_tenant_is_aadsts90002(identity_sandbox):
    response = session_for(identity_sandbox).get(
        f"{identity_sandbox.identity_url}/nosuchtenant.example/v2.0/.well-known/openid-configuration",
        headers={"client-request-id": "5f0b6c1e-0000-4000-8000-000000000001"},
    )
    assert response.status_code == 400
    body = response.json()
    assert_microsoft_error(body, 90002, "invalid_tenant")
    assert body["correlation_id"] == "5f0b6c1e-0000-4000-8000-000000000001"
    with pytest.raises(ValueError):  # MSAL refuses to build an application for it
        msal_app(identity_sandbox, tenant="nosuchtenant.example")


# authorization code + PKCE ---------------------------------------------------------------------


def test_auth_code_flow_with_pkce_gives_exchange_shaped_tokens(identity_sandbox):
    app = msal_app(identity_sandbox)
    flow, params = sign_in(identity_sandbox, app)
    assert params["state"] == flow["state"] and params["redirect_uri"] == REDIRECT_URI
    result = app.acquire_token_by_auth_code_flow(flow, params)
    assert "access_token" in result, result
    access = claims(result["access_token"])
    assert jwt.get_unverified_header(result["access_token"])["alg"] == "RS256"
    assert access["aud"] == EXCHANGE
    assert set(access["scp"].split()) == {"IMAP.AccessAsUser.All", "POP.AccessAsUser.All", "SMTP.Send"}
    assert access["scope"] == access["scp"]  # Dovecot reads `scope`
    assert access["upn"] == "alice@contoso.com"
    assert access["tid"] == identity_sandbox.tenant()["id"]
    assert access["oid"] == identity_sandbox.user("alice@contoso.com")["oid"]
    # MSAL sends the SHA-256 of its nonce and checks the id_token carries it back
    assert result["id_token_claims"]["nonce"] == hashlib.sha256(flow["nonce"].encode()).hexdigest()
    assert result["id_token_claims"]["preferred_username"] == "alice@contoso.com"
    assert result["refresh_token"]
    account = app.get_accounts()[0]
    assert account["username"] == "alice@contoso.com"
    assert account["home_account_id"] == f"{access['oid']}.{access['tid']}"


def test_query_response_mode_redirects_with_code(identity_sandbox):
    app = msal_app(identity_sandbox)
    flow = app.initiate_auth_code_flow(SCOPES, redirect_uri=REDIRECT_URI, response_mode="query")
    params = identity_sandbox.sign_in(flow["auth_uri"], "bob@contoso.com")
    assert params["code"] and params["state"] == flow["state"]
    assert "access_token" in app.acquire_token_by_auth_code_flow(flow, params)


def test_signed_in_session_is_reused_unless_select_account(identity_sandbox):
    app = msal_app(identity_sandbox)
    browser = session_for(identity_sandbox)
    flow, params = sign_in(identity_sandbox, app, browser=browser)
    silent = app.initiate_auth_code_flow(SCOPES, redirect_uri=REDIRECT_URI, response_mode="form_post")
    page = browser.get(silent["auth_uri"], allow_redirects=False)
    assert "hiddenform" in page.text and "code" in page.text  # no account picker shown
    forced = app.initiate_auth_code_flow(SCOPES, redirect_uri=REDIRECT_URI, prompt="select_account")
    page = browser.get(forced["auth_uri"], allow_redirects=False)
    assert 'name="account"' in page.text  # the picker is shown again
    assert 'value="alice@contoso.com"' in page.text


def test_wrong_pkce_verifier_is_refused(identity_sandbox):
    app = msal_app(identity_sandbox)
    flow, params = sign_in(identity_sandbox, app)
    flow["code_verifier"] = "x" * 43
    assert_microsoft_error(app.acquire_token_by_auth_code_flow(flow, params), 501481, "invalid_grant")


def test_code_is_single_use(identity_sandbox):
    app = msal_app(identity_sandbox)
    flow, params = sign_in(identity_sandbox, app)
    assert "access_token" in app.acquire_token_by_auth_code_flow(dict(flow), dict(params))
    assert_microsoft_error(app.acquire_token_by_auth_code_flow(dict(flow), dict(params)), 54005, "invalid_grant")


def test_redirect_uri_must_match_the_code(identity_sandbox):
    app = msal_app(identity_sandbox)
    flow, params = sign_in(identity_sandbox, app)
    flow["redirect_uri"] = "http://127.0.0.1:8069/microsoft365/oauth/callback"
    assert_microsoft_error(app.acquire_token_by_auth_code_flow(flow, params), 500112, "invalid_grant")


def test_unregistered_redirect_uri_is_aadsts50011_on_microsofts_page(identity_sandbox):
    app = msal_app(identity_sandbox)
    flow = app.initiate_auth_code_flow(SCOPES, redirect_uri="https://evil.example/callback")
    page = session_for(identity_sandbox).get(flow["auth_uri"], allow_redirects=False)
    assert page.status_code == 400 and "AADSTS50011" in page.text  # never sent to the unverified URI
    assert "Location" not in page.headers


def test_unknown_client_id_is_aadsts700016(identity_sandbox):
    app = msal_app(identity_sandbox, client_id="00000000-0000-0000-0000-00000000dead")
    result = app.acquire_token_for_client(APP_SCOPE)
    assert_microsoft_error(result, 700016, "unauthorized_client")
    flow = app.initiate_auth_code_flow(SCOPES, redirect_uri=REDIRECT_URI)
    page = session_for(identity_sandbox).get(flow["auth_uri"], allow_redirects=False)
    assert page.status_code == 400 and "AADSTS700016" in page.text


def test_single_tenant_app_on_organizations_is_aadsts50194(identity_sandbox):
    app = msal_app(identity_sandbox, tenant="organizations")
    flow, params = sign_in(identity_sandbox, app)
    assert params["error"] == "invalid_request" and params["error_description"].startswith("AADSTS50194")
    assert params["state"] == flow["state"]
    with pytest.raises(ValueError, match="AADSTS50194"):
        app.acquire_token_by_auth_code_flow(flow, params) if "error" not in params else _raise(params)


def _raise(params):
    raise ValueError(params["error_description"])


def test_cancel_and_missing_consent_go_back_as_errors(fresh):
    app = msal_app(fresh, app_name="Unconsented app")
    _, params = sign_in(fresh, app, accept=False)
    assert params["error"] == "access_denied" and params["error_description"].startswith("AADSTS65004")
    _, params = sign_in(fresh, app, consent=False)
    assert params["error"] == "consent_required" and params["error_description"].startswith("AADSTS65001")
    flow, params = sign_in(fresh, app)  # consenting for oneself works
    assert "access_token" in app.acquire_token_by_auth_code_flow(flow, params)


def test_tenant_without_exchange_is_aadsts500011(fresh):
    partner = fresh.app("Partner Mail (multi-tenant)")
    fabrikam = fresh.tenant("Fabrikam")["id"]
    app = msal_app(fresh, app_name="Partner Mail (multi-tenant)", tenant="organizations")
    _, params = sign_in(fresh, app, account="carol@fabrikam.onmicrosoft.com")
    assert params["error"] == "invalid_resource" and params["error_description"].startswith("AADSTS500011")
    fresh.control("consent", client_id=partner["client_id"], tenant=fabrikam)
    app = msal_app(fresh, app_name="Partner Mail (multi-tenant)", tenant=fabrikam)
    assert_microsoft_error(app.acquire_token_for_client(APP_SCOPE), 500011, "invalid_resource")


# refresh -------------------------------------------------------------------------------------


def signed_in(sandbox, account="alice@contoso.com"):
    app = msal_app(sandbox)
    flow, params = sign_in(sandbox, app, account=account)
    result = app.acquire_token_by_auth_code_flow(flow, params)
    assert "access_token" in result, result
    return app, result


def test_refresh_rotates_and_the_old_refresh_token_dies(fresh):
    app, first = signed_in(fresh)
    second = app.acquire_token_by_refresh_token(first["refresh_token"], SCOPES)
    assert second["access_token"] != first["access_token"]
    assert second["refresh_token"] != first["refresh_token"]
    assert_microsoft_error(app.acquire_token_by_refresh_token(first["refresh_token"], SCOPES), 70000, "invalid_grant")
    assert "access_token" in app.acquire_token_by_refresh_token(second["refresh_token"], SCOPES)


def test_msal_silent_refresh_rotates_inside_its_cache(fresh):
    app, _ = signed_in(fresh)
    account = app.get_accounts()[0]
    cached = app.acquire_token_silent_with_error(SCOPES, account)
    assert cached["token_source"] == "cache"
    before = fresh.counter("token:refresh_token")
    refreshed = app.acquire_token_silent_with_error(SCOPES, account, force_refresh=True)
    assert refreshed["token_source"] == "identity_provider"
    assert fresh.counter("token:refresh_token") == before + 1
    again = app.acquire_token_silent_with_error(SCOPES, account, force_refresh=True)
    assert "access_token" in again, again  # MSAL used the rotated refresh token it stored


@pytest.mark.parametrize(
    "lever, code",
    [
        ("revoke_sessions", 50173),
        ("expire_refresh_tokens", 700082),
        ("require_mfa", 50076),
        ("consent", 65001),
    ],
)
def test_refresh_failures_are_microsofts(fresh, lever, code):
    app, result = signed_in(fresh)
    if lever == "consent":
        fresh.control("consent", client_id=fresh.app()["client_id"], tenant=fresh.tenant()["id"], granted=False)
    else:
        fresh.control(lever, user="alice@contoso.com")
    assert_microsoft_error(app.acquire_token_by_refresh_token(result["refresh_token"], SCOPES), code, "invalid_grant")


# client credentials ----------------------------------------------------------------------------


def test_client_credentials_with_secret_gives_app_roles(fresh):
    result = msal_app(fresh).acquire_token_for_client(APP_SCOPE)
    access = claims(result["access_token"])
    assert access["aud"] == "https://outlook.office365.com"
    assert set(access["roles"]) == {"IMAP.AccessAsApp", "POP.AccessAsApp", "SMTP.SendAsApp"}
    assert access["appid"] == fresh.app()["client_id"] and access["appidacr"] == "1"
    assert "scp" not in access and "upn" not in access


def test_client_credentials_need_a_tenant_and_default_scope(fresh):
    assert_microsoft_error(msal_app(fresh).acquire_token_for_client([f"{EXCHANGE}/IMAP.AccessAsUser.All"]), 1002012)
    app = msal_app(fresh, app_name="Partner Mail (multi-tenant)", tenant="organizations")
    assert_microsoft_error(app.acquire_token_for_client(APP_SCOPE), 900023)


def test_without_admin_consent_app_tokens_carry_no_roles(fresh):
    result = msal_app(fresh, app_name="Unconsented app").acquire_token_for_client(APP_SCOPE)
    assert "roles" not in claims(result["access_token"])


@pytest.mark.parametrize("secret, code", [("wrong", 7000215), ("expired", 7000222)])
def test_bad_client_secrets(fresh, secret, code):
    credential = "not-the-secret" if secret == "wrong" else fresh.secret(which="expired")
    result = msal_app(fresh, credential=credential).acquire_token_for_client(APP_SCOPE)
    assert_microsoft_error(result, code, "invalid_client")


def ps256(certificate, private_key=None):
    """What MSAL sends PS256 with x5t#S256 for: no SHA-1 thumbprint, the public certificate."""
    return {"private_key": private_key or certificate["private_key"], "public_certificate": certificate["certificate"]}


def test_client_credentials_with_a_certificate_need_ps256_and_the_sha256_thumbprint(fresh):
    """CONFORMANCE ID-27, ID-28: Entra asks for PS256 with x5t#S256; the SHA-1 form (RS256 + x5t) is refused."""
    certificate = fresh.certificate()
    result = msal_app(fresh, credential=ps256(certificate)).acquire_token_for_client(APP_SCOPE)
    assert claims(result["access_token"])["appidacr"] == "2", result
    sha1 = {"private_key": certificate["private_key"], "thumbprint": certificate["thumbprint"]}
    assert_microsoft_error(msal_app(fresh, credential=sha1).acquire_token_for_client(APP_SCOPE), 700027)


def test_certificate_assertion_also_redeems_a_code(fresh):
    app = msal_app(fresh, credential=ps256(fresh.certificate()))
    flow, params = sign_in(fresh, app)
    assert claims(app.acquire_token_by_auth_code_flow(flow, params)["access_token"])["appidacr"] == "2"


def test_unregistered_or_expired_certificate_is_aadsts700027(fresh):
    key, cert = make_client_certificate("not registered")
    unregistered = {"private_key": key, "public_certificate": cert}
    assert_microsoft_error(msal_app(fresh, credential=unregistered).acquire_token_for_client(APP_SCOPE), 700027)
    expired = ps256(fresh.certificate(which="expired"))
    assert_microsoft_error(msal_app(fresh, credential=expired).acquire_token_for_client(APP_SCOPE), 700027)


def test_assertion_signed_by_another_key_is_refused(fresh):
    other_key, _ = make_client_certificate("impostor")
    credential = ps256(fresh.certificate(), private_key=other_key)
    assert_microsoft_error(msal_app(fresh, credential=credential).acquire_token_for_client(APP_SCOPE), 700027)


def test_error_description_separates_trace_lines_with_crlf(fresh):
    """CONFORMANCE ID-09: "AADSTS…: text\\r\\nTrace ID: …\\r\\nCorrelation ID: …\\r\\nTimestamp: …"."""
    result = msal_app(fresh, credential="not-the-secret").acquire_token_for_client(APP_SCOPE)
    lines = result["error_description"].split("\r\n")
    assert lines[0].startswith("AADSTS7000215: ") and len(lines) == 4, result["error_description"]
    assert [line.split(": ")[0] for line in lines[1:]] == ["Trace ID", "Correlation ID", "Timestamp"]


# faults --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, status, code", [("429", 429, 90055), ("503", 503, 90033)])
def test_token_endpoint_faults(fresh, kind, status, code):
    fresh.control("token_fault", kind=kind, count=1, retry_after=7)
    url = f"{fresh.authority()}/oauth2/v2.0/token"
    response = session_for(fresh).post(
        url, data={"client_id": fresh.app()["client_id"], "grant_type": "client_credentials"}
    )
    assert response.status_code == status
    assert response.headers["Retry-After"] == "7"
    assert_microsoft_error(response.json(), code, "temporarily_unavailable")
    assert "access_token" in msal_app(fresh).acquire_token_for_client(APP_SCOPE)  # one fault only


def test_token_endpoint_can_hang(fresh):
    fresh.control("token_fault", kind="hang", seconds=2, count=1)
    started = time.monotonic()
    with pytest.raises(requests.Timeout):
        session_for(fresh).post(f"{fresh.authority()}/oauth2/v2.0/token", data={"client_id": "x"}, timeout=0.5)
    assert time.monotonic() - started < 2


# admin consent ---------------------------------------------------------------------------------


def admin_consent_url(sandbox, state="12345"):
    from urllib.parse import urlencode

    query = urlencode({"client_id": sandbox.app()["client_id"], "redirect_uri": REDIRECT_URI, "state": state})
    return f"{sandbox.authority()}/adminconsent?{query}"


def test_admin_consent_granted_carries_tenant_scope_and_state(fresh):
    """CONFORMANCE ID-25: ?admin_consent=True&tenant=<guid>&scope=<granted scopes>&state=12345."""
    params = fresh.sign_in(admin_consent_url(fresh), "admin@contoso.com")
    assert (params["admin_consent"], params["tenant"], params["state"]) == ("True", fresh.tenant()["id"], "12345")
    assert "https://outlook.office365.com/IMAP.AccessAsApp" in params["scope"].split()
    assert "error" not in params


@pytest.mark.parametrize(
    "shape, error, text",
    [
        ("access_denied", "access_denied", "User declined to consent to access the app."),
        ("consent_required", "consent_required", "The resource owner or authorization server denied the request."),
    ],
)
def test_admin_consent_declined_carries_error_and_admin_consent_true(fresh, shape, error, text):
    """CONFORMANCE ID-24: error, error_description (CR LF trace lines), error_uri, admin_consent=True and
    state arrive together (MicrosoftDocs/azure-docs#114009; Microsoft's example uses consent_required)."""
    fresh.control("settings", admin_consent_error=shape)
    params = fresh.sign_in(admin_consent_url(fresh, "st4te"), "admin@contoso.com", accept=False)
    assert (params["error"], params["admin_consent"], params["state"]) == (error, "True", "st4te")
    assert params["error_description"].startswith(f"AADSTS65004: {text}\r\nTrace ID: ")
    assert params["error_uri"] == "https://login.microsoftonline.com/error?code=65004"
    assert "tenant" not in params
