"""Microsoft identity platform v2.0 on loopback: discovery, sign-in page, token endpoint, keys,
introspection, and a control interface for tests (/_sandbox/...).

Answers are shaped like Microsoft's, errors included (AADSTS codes, trace and correlation ids,
HTTP statuses), so that MSAL and the addon meet exactly what they meet in production.
"""

import base64
import datetime
import email.message
import email.utils
import hashlib
import html
import json
import logging
import secrets
import time
import uuid
from http import cookies
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qsl, urlencode, urlsplit

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes

_logger = logging.getLogger(__name__)

EXCHANGE_RESOURCES = ("https://outlook.office.com", "https://outlook.office365.com")
GRAPH_RESOURCE = "https://graph.microsoft.com"
OIDC_SCOPES = {"openid", "profile", "offline_access", "email"}
AUTHORITY_ALIASES = ("common", "organizations", "consumers")
CODE_LIFETIME = 600
SESSION_COOKIE = "ESTSAUTH"

MESSAGES = {
    50011: "The redirect URI '{redirect_uri}' specified in the request does not match the redirect URIs "
    "configured for the application '{client_id}'. Make sure the redirect URI sent in the request "
    "matches one added to your application in the Azure portal.",
    50058: "A silent sign-in request was sent but no user is signed in.",
    50076: "Due to a configuration change made by your administrator, or because you moved to a new "
    "location, you must use multi-factor authentication to access '{resource}'.",
    50173: "The provided grant has expired due to it being revoked, a fresh auth token is needed. The user "
    "might have changed or reset their password. The grant was issued on '{issued}' and the "
    "TokensValidFrom date (before which tokens are not valid) for this user is '{valid_from}'.",
    50194: "Application '{client_id}'({app_name}) is not configured as a multi-tenant application. Usage of "
    "the /{tenant} endpoint is not supported for such applications created after '10/15/2018'. Use a "
    "tenant-specific endpoint or configure the application to be multi-tenant.",
    50079: "Due to a configuration change made by your administrator, or because you moved to a new "
    "location, you must enroll in multi-factor authentication to access '{resource}'.",
    53003: "Access has been blocked by Conditional Access policies. The access policy does not allow token issuance.",
    54005: "OAuth2 Authorization code was already redeemed, please retry with a new valid code or use an "
    "existing refresh token.",
    65001: "The user or administrator has not consented to use the application with ID '{client_id}' named "
    "'{app_name}'. Send an interactive authorization request for this user and resource.",
    65004: "User declined to consent to access the app.",
    70000: "The request was denied because one or more scopes requested are unauthorized or expired. The "
    "user must first sign in and grant the client application access to the requested scope.",
    70008: "The provided authorization code or refresh token has expired due to inactivity. Send a new "
    "interactive authorization request for this user and resource.",
    70011: "The provided request must include a 'scope' input parameter. The provided value for the input "
    "parameter 'scope' is not valid. The scope {scope} is not valid.",
    90002: "Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID and are signing "
    "into the correct cloud. Check with your subscription administrator, this may happen if there "
    "are no active subscriptions for the tenant.",
    90033: "A transient error has occurred. Please try again.",
    90094: "Administrator consent is required.",
    90055: "TenantThrottlingError - There are too many incoming requests. Please retry later.",
    500011: "The resource principal named {resource} was not found in the tenant named {tenant_name}. This "
    "can happen if the application has not been installed by the administrator of the tenant or "
    "consented to by any user in the tenant. You might have sent your authentication request to "
    "the wrong tenant.",
    500112: "The reply address '{redirect_uri}' does not match the reply address '{code_redirect_uri}' "
    "provided when requesting Authorization code.",
    501481: "The Code_Verifier does not match the code_challenge supplied in the authorization request.",
    700082: "The refresh token has expired due to inactivity. The token was issued on {issued} and was "
    "inactive for 90.00:00:00.",
    700016: "Application with identifier '{client_id}' was not found in the directory '{tenant_name}'. This "
    "can happen if the application has not been installed by the administrator of the tenant or "
    "consented to by any user in the tenant. You may have sent your authentication request to the "
    "wrong tenant.",
    700024: "Client assertion is not within its valid time range.",
    700027: "The certificate with identifier used to sign the client assertion is not registered on "
    "application. [Reason - The key was not found., Thumbprint of key used by client: "
    "'{thumbprint}']",
    7000215: "Invalid client secret provided. Ensure the secret being sent in the request is the client "
    "secret value, not the client secret ID, for a secret added to app '{client_id}'.",
    7000218: "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.",
    7000222: "The provided client secret keys for app '{client_id}' are expired. Visit the Azure portal to "
    "create new keys for your app: https://aka.ms/NewClientSecret, or consider using certificate "
    "credentials for added security: https://aka.ms/certCreds.",
    900023: "Specified tenant identifier '{tenant}' is neither a valid DNS name, nor a valid external domain.",
    900144: "The request body must contain the following parameter: '{parameter}'.",
    1002012: "The provided value for scope {scope} is not valid. Client credential flows must have a scope "
    "value with /.default suffixed to the resource identifier (application ID URI).",
}


class OAuthError(Exception):
    """An answer the way Microsoft gives it: `error`, AADSTS text, codes and ids."""

    def __init__(self, error, code, status=400, headers=None, **params):
        self.error, self.code, self.status = error, code, status
        self.headers = headers or {}
        self.description_text = f"AADSTS{code}: " + MESSAGES[code].format_map(_Missing(params))
        super().__init__(self.description_text)

    def body(self, correlation_id):
        now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")
        trace_id = str(uuid.uuid4())
        return {
            "error": self.error,
            # Entra separates the trace lines with CR LF (CONFORMANCE ID-09).
            "error_description": f"{self.description_text}\r\nTrace ID: {trace_id}\r\nCorrelation ID: "
            f"{correlation_id}\r\nTimestamp: {now}",
            "error_codes": [self.code],
            "timestamp": now,
            "trace_id": trace_id,
            "correlation_id": correlation_id,
            "error_uri": f"https://login.microsoftonline.com/error?code={self.code}",
        }


class _Missing(dict):
    def __missing__(self, key):
        return ""


def _b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _thumbprint_bytes(value):
    """x5t values arrive base64url with or without padding (MSAL pads); compare the raw digests."""
    if not value:
        return None
    try:
        return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except ValueError:
        return None


def parse_scopes(scope_text):
    """(resource, permissions, oidc) from a v2.0 scope parameter; a bare name means Microsoft Graph."""
    resource, permissions, oidc = None, [], set()
    for scope in (scope_text or "").split():
        if scope in OIDC_SCOPES:
            oidc.add(scope)
            continue
        owner, _, permission = scope.rpartition("/") if "/" in scope else (GRAPH_RESOURCE, "", scope)
        owner = owner.rstrip("/")
        if resource and owner != resource:
            raise OAuthError("invalid_scope", 70011, scope=scope)  # one resource per request
        resource = owner
        permissions.append(permission)
    return resource, permissions, oidc


class IdentityServer:
    def __init__(self, directory, tls, host="127.0.0.1", port=0):
        self.directory = directory
        self.tls = tls
        from .service import https_server  # service.py imports this module

        handler = type("Handler", (_Handler,), {"identity": self})
        self.httpd = https_server(handler, tls, host, port)
        self.port = self.httpd.server_address[1]
        self.base_url = f"https://{host}:{self.port}"
        self._thread = None
        self.deliver = None  # set by the service once the mail servers run
        self.graph = None  # the Graph server, once it runs (its "hold" faults)

    def start(self):
        from .service import serve

        self._thread = serve(self.httpd, "sandbox-identity")

    def stop(self):
        from .service import shut

        shut(self.httpd)

    # helpers -------------------------------------------------------------------------------

    def resolve_tenant(self, segment):
        """(tenant record or None for an alias, alias or tenant id); raises 90002 when unknown."""
        if segment in AUTHORITY_ALIASES:
            return None, segment
        tenant = self.directory.tenant(segment)
        if tenant is None:
            raise OAuthError("invalid_tenant", 90002, tenant=segment)
        return tenant, tenant["id"]

    def openid_configuration(self, segment):
        tenant, key = self.resolve_tenant(segment)
        base = f"{self.base_url}/{key}"
        issuer_tenant = tenant["id"] if tenant else "{tenantid}"
        return {
            "token_endpoint": f"{base}/oauth2/v2.0/token",
            "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt", "client_secret_basic"],
            "jwks_uri": f"{base}/discovery/v2.0/keys",
            "response_modes_supported": ["query", "fragment", "form_post"],
            "subject_types_supported": ["pairwise"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
            "scopes_supported": ["openid", "profile", "email", "offline_access"],
            "issuer": f"{self.base_url}/{issuer_tenant}/v2.0",
            "request_uri_parameter_supported": False,
            "userinfo_endpoint": f"{self.base_url}/oidc/userinfo",
            "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
            "device_authorization_endpoint": f"{base}/oauth2/v2.0/devicecode",
            "http_logout_supported": True,
            "frontchannel_logout_supported": True,
            "end_session_endpoint": f"{base}/oauth2/v2.0/logout",
            "claims_supported": [
                "sub",
                "iss",
                "aud",
                "exp",
                "iat",
                "nonce",
                "preferred_username",
                "name",
                "tid",
                "ver",
                "email",
                "oid",
            ],
            "kerberos_endpoint": f"{base}/kerberos",
            "tenant_region_scope": "EU",
            "cloud_instance_name": "microsoftonline.com",
            "cloud_graph_host_name": "graph.windows.net",
            "msgraph_host": "graph.microsoft.com",
            "rbac_url": "https://pas.windows.net",
        }

    def jwks(self, segment):
        """The signing keys, each naming the issuer it signs for (CONFORMANCE SIGNIN-05): the tenant's
        issuer on a tenant's endpoint, the `{tenantid}` template on common/organizations."""
        tenant, _key = self.resolve_tenant(segment)
        issuer = f"{self.base_url}/{tenant['id'] if tenant else '{tenantid}'}/v2.0"
        return {"keys": [{**key, "issuer": issuer} for key in self.directory.signer.jwks["keys"]]}

    def app_for(self, client_id, tenant, alias, *, page=False):
        app = self.directory.app(client_id)
        tenant_name = tenant["name"] if tenant else alias
        if app is None:
            raise OAuthError("unauthorized_client", 700016, client_id=client_id, tenant_name=tenant_name)
        if tenant is None and not app["multi_tenant"]:
            raise OAuthError("invalid_request", 50194, client_id=app["client_id"], app_name=app["name"], tenant=alias)
        if tenant is not None and not app["multi_tenant"] and tenant["id"] != app["home_tenant"]:
            raise OAuthError("unauthorized_client", 700016, client_id=client_id, tenant_name=tenant_name)
        return app

    def authenticate_client(self, app, form, token_endpoint):
        """Client secret or certificate assertion; returns the appidacr claim ("1" secret, "2" cert)."""
        if form.get("client_assertion"):
            return self._verify_assertion(app, form["client_assertion"], token_endpoint)
        if not form.get("client_secret"):
            raise OAuthError("invalid_client", 7000218, status=401)
        matching = [s for s in app["secrets"] if secrets.compare_digest(s["value"], form["client_secret"])]
        if not matching:
            raise OAuthError("invalid_client", 7000215, status=401, client_id=app["client_id"])
        if all(s["expires"] < time.time() for s in matching):
            raise OAuthError("invalid_client", 7000222, status=401, client_id=app["client_id"])
        return "1"

    def _verify_assertion(self, app, assertion, token_endpoint):
        header = jwt.get_unverified_header(assertion)
        # Entra asks for PS256 with the SHA-256 thumbprint (x5t#S256); the SHA-1 x5t with RS256 is
        # refused here (CONFORMANCE ID-27, ID-28).
        if header.get("alg") != "PS256" or not header.get("x5t#S256"):
            raise OAuthError("invalid_client", 700027, status=401, thumbprint=header.get("x5t", ""))
        wanted = None
        for registered in app["certificates"]:
            cert = x509.load_pem_x509_certificate(registered["certificate"].encode())
            if _thumbprint_bytes(header.get("x5t#S256")) == cert.fingerprint(hashes.SHA256()):
                wanted = cert
                break
        if wanted is None:
            raise OAuthError("invalid_client", 700027, status=401, thumbprint=header.get("x5t#S256", ""))
        now = datetime.datetime.utcnow()  # cryptography < 42 has only the naive UTC validity dates
        if not (wanted.not_valid_before <= now <= wanted.not_valid_after):
            raise OAuthError("invalid_client", 700027, status=401, thumbprint=header.get("x5t#S256", ""))
        try:
            claims = jwt.decode(
                assertion,
                wanted.public_key(),
                algorithms=["PS256"],
                audience=[token_endpoint, token_endpoint.replace("/v2.0/token", "/token")],
                options={"require": ["exp", "aud", "iss", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise OAuthError("invalid_client", 700024, status=401) from None
        except jwt.InvalidTokenError:
            raise OAuthError("invalid_client", 700027, status=401, thumbprint=header.get("x5t#S256", "")) from None
        if claims["iss"] != app["client_id"] or claims["sub"] != app["client_id"]:
            raise OAuthError("invalid_client", 700027, status=401, thumbprint=header.get("x5t#S256", ""))
        return "2"

    def delegated_consent(self, app, tenant_id, upn, resource=None):
        """Consent to the app's delegated permissions; for Microsoft Graph, a consent that covers Graph
        (an administrator's covers every permission listed; a user's covers what the user was asked)."""
        return any(
            c["client_id"] == app["client_id"]
            and c["tenant"] == tenant_id
            and c.get("delegated")
            and c.get("upn", upn) == upn
            and (resource != GRAPH_RESOURCE or c.get("graph", True))
            for c in self.directory.data["consents"]
        )

    @staticmethod
    def delegated_permissions(app, resource):
        return app.get("graph_delegated", []) if resource == GRAPH_RESOURCE else app["delegated"]

    # tokens --------------------------------------------------------------------------------

    def issue_user_tokens(self, app, grant, appidacr, nonce=None):
        directory = self.directory
        user = directory.user(grant["upn"])
        lifetime = directory.access_token_lifetime()
        tid = user["tenant"]
        scp = " ".join(grant["permissions"])
        access_claims = {
            # Exchange's and Graph's resource ids as their tokens carry them (CONFORMANCE GRAPH-03)
            "aud": "https://outlook.office.com" if grant["resource"] in EXCHANGE_RESOURCES else grant["resource"],
            "iss": f"https://sts.windows.net/{tid}/",
            "tid": tid,
            "oid": user["oid"],
            "sub": user["oid"],
            "upn": user["upn"],
            "unique_name": user["upn"],
            "name": user["name"],
            "appid": app["client_id"],
            "app_displayname": app["name"],
            "appidacr": appidacr,
            "scp": scp,
            "scope": scp,
            "amr": ["pwd", "mfa"] if grant.get("mfa") else ["pwd"],
            "ver": "1.0",
        }
        access_token = directory.signer.issue(access_claims, lifetime)
        id_claims = {
            "aud": app["client_id"],
            "iss": f"{self.base_url}/{tid}/v2.0",
            "tid": tid,
            "oid": user["oid"],
            "sub": _b64url(hashlib.sha256((user["oid"] + app["client_id"]).encode()).digest()),
            # A guest's preferred_username is the address it signs in with at home (SIGNIN-04).
            "preferred_username": user.get("home_upn") or user["upn"],
            "name": user["name"],
            "ver": "2.0",
        }
        if user.get("home_tenant"):  # a guest: authenticated by its home tenant
            id_claims["idp"] = f"https://sts.windows.net/{user['home_tenant']}/"
        if user.get("email") and ("email" in grant.get("oidc", ()) or user.get("home_tenant")):
            id_claims["email"] = user["email"]  # the Mail attribute, verified or not (SIGNIN-03)
        if nonce:
            id_claims["nonce"] = nonce
        directory.count(f"token_issued:{user['upn']}")
        return {
            "token_type": "Bearer",
            "scope": " ".join(f"{grant['resource']}/{p}" for p in grant["permissions"]),
            "expires_in": lifetime,
            "ext_expires_in": lifetime,
            "access_token": access_token,
            "refresh_token": directory.issue_refresh_token(grant),
            "id_token": self._id_token(app, id_claims),
            "client_info": _b64url(json.dumps({"uid": user["oid"], "utid": tid}).encode()),
        }

    def _id_token(self, app, claims):
        """The ID token, spoilt once as the control action `id_token_fault` asks (tests of the client's
        validation): another audience, issuer or tenant, a wrong nonce, expired, not yet valid, or
        signed by a key the keys endpoint does not publish."""
        directory = self.directory
        with directory.lock:
            fault = directory.id_token_fault
            if fault and claims.get("nonce"):  # only sign-ins (the auth-code flow), never a refresh
                fault["remaining"] -= 1
                if fault["remaining"] <= 0:
                    directory.id_token_fault = None
            else:
                fault = None
        if fault is None:
            return directory.signer.issue(claims, 3600)
        kind = fault["kind"]
        directory.count(f"id_token_fault:{kind}")
        other_tenant = next(t["id"] for t in directory.data["tenants"] if t["id"] != claims["tid"])
        now = int(time.time())
        if kind == "audience":
            claims = {**claims, "aud": str(uuid.uuid5(uuid.NAMESPACE_URL, "another client"))}
        elif kind == "issuer":  # the issuer of another tenant, tid unchanged
            claims = {**claims, "iss": f"{self.base_url}/{other_tenant}/v2.0"}
        elif kind == "tenant":  # consistently another tenant
            claims = {**claims, "iss": f"{self.base_url}/{other_tenant}/v2.0", "tid": other_tenant}
        elif kind == "nonce":
            claims = {**claims, "nonce": hashlib.sha256(b"another sign-in").hexdigest()}
        elif kind == "expired":
            return directory.signer.issue({**claims, "iat": now - 7200, "nbf": now - 7200, "exp": now - 3600}, 0)
        elif kind == "not_yet_valid":
            return directory.signer.issue({**claims, "iat": now + 3600, "nbf": now + 3600, "exp": now + 7200}, 0)
        elif kind == "signature":
            return directory.signer.issue_with_unpublished_key(claims, 3600)
        elif kind == "unsigned":
            return directory.signer.issue_unsigned(claims, 3600)
        return directory.signer.issue(claims, 3600)

    def issue_app_token(self, app, tenant, appidacr, resource="https://outlook.office365.com"):
        directory = self.directory
        consent = directory.consent(app["client_id"], tenant["id"])
        granted = consent and consent.get("application")
        if resource == GRAPH_RESOURCE:
            roles = list(app.get("graph_application", [])) if granted and consent.get("graph", True) else []
        else:
            roles = list(app["application"]) if granted else []
        lifetime = directory.access_token_lifetime()
        object_id = next(
            (
                sp["object_id"]
                for sp in directory.data["service_principals"]
                if sp["client_id"] == app["client_id"] and sp["tenant"] == tenant["id"]
            ),
            None,
        ) or str(uuid.uuid5(uuid.NAMESPACE_URL, app["client_id"] + tenant["id"]))
        claims = {
            "aud": resource,
            "iss": f"https://sts.windows.net/{tenant['id']}/",
            "tid": tenant["id"],
            "oid": object_id,
            "sub": object_id,
            "appid": app["client_id"],
            "app_displayname": app["name"],
            "appidacr": appidacr,
            "idtyp": "app",
            "ver": "1.0",
        }
        if roles:
            claims["roles"] = roles
        return {
            "token_type": "Bearer",
            "expires_in": lifetime,
            "ext_expires_in": lifetime,
            "access_token": directory.signer.issue(claims, lifetime),
        }


class _Handler(BaseHTTPRequestHandler):
    identity = None  # set on the subclass the server builds
    server_version = "Microsoft-IIS/10.0"  # what login.microsoftonline.com answers with
    sys_version = ""

    def log_message(self, format, *args):
        _logger.debug("identity: " + format, *args)

    def setup(self):
        self._round_trip()  # the connection's handshake crosses the network
        super().setup()

    def send_response(self, code, message=None):
        self._round_trip()  # every reply crosses the network
        super().send_response(code, message)

    def _round_trip(self):
        seconds = self.identity.directory.latency()
        if seconds:
            time.sleep(seconds)

    # plumbing ------------------------------------------------------------------------------

    def _send(self, status, body, content_type="application/json; charset=utf-8", headers=None):
        payload = (
            body
            if isinstance(body, bytes)
            else (json.dumps(body) if content_type.startswith("application/json") else body).encode()
        )
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Cache-Control", "no-store, no-cache")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)

    def _form(self):
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length).decode("utf-8", "replace") if length else ""
        if (self.headers.get("Content-Type") or "").startswith("application/json"):
            return json.loads(raw or "{}")
        return dict(parse_qsl(raw, keep_blank_values=True))

    def _correlation_id(self):
        return self.headers.get("client-request-id") or str(uuid.uuid4())

    def _json_error(self, error):
        self._send(error.status, error.body(self._correlation_id()), headers=error.headers)

    def _route(self):
        parts = urlsplit(self.path)
        return parts.path.strip("/").split("/"), dict(parse_qsl(parts.query, keep_blank_values=True))

    def do_GET(self):
        segments, query = self._route()
        try:
            if segments[1:] == ["v2.0", ".well-known", "openid-configuration"]:
                self.identity.directory.count("openid_configuration")
                return self._send(200, self.identity.openid_configuration(segments[0]))
            if segments[1:] == ["discovery", "v2.0", "keys"]:
                return self._send(200, self.identity.jwks(segments[0]))
            if segments[1:] == ["oauth2", "v2.0", "authorize"]:
                return self._authorize(segments[0], query, submitted=None)
            if segments[1:] == ["adminconsent"]:
                return self._admin_consent(segments[0], query, submitted=None)
            if segments[:1] == ["_sandbox"] and segments[1:] == ["state"]:
                return self._send(200, _control_state(self.identity))
        except OAuthError as error:
            return self._json_error(error)
        self._send(404, {"error": "not_found"})

    def do_POST(self):
        segments, query = self._route()
        try:
            if segments[1:] == ["oauth2", "v2.0", "token"]:
                return self._token(segments[0])
            if segments[1:] == ["oauth2", "v2.0", "authorize"]:
                return self._authorize(segments[0], query, submitted=self._form())
            if segments[1:] == ["adminconsent"]:
                return self._admin_consent(segments[0], query, submitted=self._form())
            if segments == ["_sandbox", "introspect"]:
                return self._introspect(self._form())
            if segments[:1] == ["_sandbox"] and len(segments) == 2:
                return self._control(segments[1], self._form())
        except OAuthError as error:
            return self._json_error(error)
        self._send(404, {"error": "not_found"})

    # authorize -----------------------------------------------------------------------------

    def _error_page(self, error):
        body = (
            f"<!DOCTYPE html><html><head><title>Sign in to your account</title></head><body>"
            f"<h1>Sorry, but we're having trouble signing you in.</h1>"
            f"<p id='error'>{html.escape(error.description_text)}</p></body></html>"
        )
        self._send(400, body, "text/html; charset=utf-8")

    def _reply_to_client(self, params, query, extra_headers=None):
        """Send code or error back to the redirect URI the way response_mode asks."""
        redirect_uri = params["redirect_uri"]
        if params.get("state"):
            query = {**query, "state": params["state"]}
        if params.get("response_mode") == "form_post":
            fields = "".join(
                f'<input type="hidden" name="{html.escape(k)}" value="{html.escape(v)}"/>' for k, v in query.items()
            )
            body = (
                f"<html><head><title>Working...</title></head><body onload='document.forms[0].submit()'>"
                f"<form method='POST' name='hiddenform' action='{html.escape(redirect_uri)}'>{fields}"
                f"<noscript><p>Script is disabled. Click Submit to continue.</p>"
                f"<input type='submit' value='Submit'/></noscript></form></body></html>"
            )
            return self._send(200, body, "text/html; charset=utf-8", extra_headers)
        separator = "&" if "?" in redirect_uri else "?"
        self.send_response(302)
        self.send_header("Location", redirect_uri + separator + urlencode(query))
        self.send_header("Content-Length", "0")
        for name, value in (extra_headers or {}).items():
            self.send_header(name, value)
        self.end_headers()

    def _error_to_client(self, params, error):
        body = error.body(self._correlation_id())
        self._reply_to_client(
            params,
            {"error": error.error, "error_description": body["error_description"], "error_uri": body["error_uri"]},
        )

    def _authorize(self, segment, query, submitted):
        identity = self.identity
        directory = identity.directory
        params = dict(submitted or query)
        directory.count("authorize")
        try:
            tenant, alias = identity.resolve_tenant(segment)
            app = directory.app(params.get("client_id"))
            if app is None:
                raise OAuthError(
                    "unauthorized_client",
                    700016,
                    client_id=params.get("client_id", ""),
                    tenant_name=tenant["name"] if tenant else alias,
                )
            if params.get("redirect_uri") not in app["redirect_uris"]:
                raise OAuthError(
                    "invalid_request", 50011, redirect_uri=params.get("redirect_uri", ""), client_id=app["client_id"]
                )
        except OAuthError as error:
            # Microsoft never sends these to an unverified redirect URI: it shows them itself.
            return self._error_page(error)
        try:
            if params.get("response_type") != "code":
                raise OAuthError("invalid_request", 900144, parameter="response_type")
            identity.app_for(app["client_id"], tenant, alias)
            resource, permissions, _oidc = parse_scopes(params.get("scope"))
            unknown = [p for p in permissions if p not in identity.delegated_permissions(app, resource)]
            if resource not in (*EXCHANGE_RESOURCES, GRAPH_RESOURCE, None) or unknown:
                raise OAuthError("invalid_scope", 70011, scope=params.get("scope", ""))
        except OAuthError as error:
            return self._error_to_client(params, error)

        eligible = [u for u in directory.users_of(tenant["id"] if tenant else None)]
        session_user = directory.sessions.get(self._session_cookie())
        hint = (params.get("login_hint") or "").lower()
        prompt = params.get("prompt", "")
        if submitted is None:
            silent_ok = (
                session_user
                and prompt not in ("select_account", "login", "consent")
                and (not hint or hint == session_user)
            )
            if silent_ok:
                return self._complete_sign_in(app, params, resource, permissions, session_user, consent=False)
            if prompt == "none":
                return self._error_to_client(params, OAuthError("login_required", 50058))
            return self._sign_in_page(app, params, eligible, hint, permissions)
        if submitted.get("action") != "accept":
            return self._error_to_client(params, OAuthError("access_denied", 65004))
        upn = next((u["upn"] for u in eligible if u["upn"].lower() == (submitted.get("account") or "").lower()), None)
        if upn is None:
            return self._sign_in_page(app, params, eligible, hint, permissions, problem="Pick an account.")
        return self._complete_sign_in(
            app,
            params,
            resource,
            permissions,
            upn,
            consent=submitted.get("consent") == "yes",
            for_organization=submitted.get("consent_org") == "yes",
        )

    def _admin_consent(self, segment, query, submitted):
        """Tenant-wide admin consent (the /adminconsent endpoint): an administrator of the tenant
        accepts every permission of the app, delegated and application, for the whole organisation."""
        identity, directory = self.identity, self.identity.directory
        params = dict(submitted or query)
        try:
            tenant, _alias = identity.resolve_tenant(segment)
            app = directory.app(params.get("client_id"))
            if tenant is None or app is None:
                raise OAuthError(
                    "unauthorized_client",
                    700016,
                    client_id=params.get("client_id", ""),
                    tenant_name=tenant["name"] if tenant else segment,
                )
            if params.get("redirect_uri") not in app["redirect_uris"]:
                raise OAuthError(
                    "invalid_request", 50011, redirect_uri=params.get("redirect_uri", ""), client_id=app["client_id"]
                )
        except OAuthError as error:
            return self._error_page(error)
        admins = [u for u in directory.users_of(tenant["id"]) if u["admin"]]
        if submitted is None:
            return self._sign_in_page(app, params, admins, "", app["delegated"] + app["application"])
        if submitted.get("action") != "accept" or submitted.get("account") not in {u["upn"] for u in admins}:
            # Both parameters arrive together: error and admin_consent=True (CONFORMANCE ID-24).
            body = OAuthError("access_denied", 65004).body(self._correlation_id())
            if directory.settings.get("admin_consent_error") == "consent_required":  # Microsoft's own example
                body["error"] = "consent_required"
                body["error_description"] = body["error_description"].replace(
                    MESSAGES[65004], "The resource owner or authorization server denied the request."
                )
            return self._reply_to_client(
                dict(params, response_mode="query"),
                {
                    "error": body["error"],
                    "error_description": body["error_description"],
                    "error_uri": body["error_uri"],
                    "admin_consent": "True",
                },
            )
        entry = {"client_id": app["client_id"], "tenant": tenant["id"], "delegated": True, "application": True}
        with directory.lock:
            directory.data["consents"] = [
                c
                for c in directory.data["consents"]
                if not (c["client_id"] == app["client_id"] and c["tenant"] == tenant["id"])
            ]
            directory.data["consents"].append(entry)
            directory.save()
        granted = [f"https://outlook.office.com/{p}" for p in app["delegated"]]
        granted += [f"https://outlook.office365.com/{p}" for p in app["application"]]
        self._reply_to_client(
            dict(params, response_mode="query"),
            {"admin_consent": "True", "tenant": tenant["id"], "scope": " ".join(granted)},
        )

    def _session_cookie(self):
        jar = cookies.SimpleCookie(self.headers.get("Cookie") or "")
        return jar[SESSION_COOKIE].value if SESSION_COOKIE in jar else None

    def _complete_sign_in(self, app, params, resource, permissions, upn, consent, for_organization=False):
        identity, directory = self.identity, self.identity.directory
        user = directory.user(upn)
        user_tenant = directory.tenant(user["tenant"])
        try:
            identity.app_for(app["client_id"], user_tenant, user_tenant["name"])
            if resource in EXCHANGE_RESOURCES and not user_tenant["exchange"]:
                raise OAuthError("invalid_resource", 500011, resource=resource, tenant_name=user_tenant["name"])
            if not identity.delegated_consent(app, user_tenant["id"], upn, resource):
                if not user["admin"] and not directory.settings.get("user_consent_allowed", True):
                    # "Need admin approval": this user may not consent (CONFORMANCE ID-15)
                    raise OAuthError("access_denied", 90094)
                if not consent:
                    raise OAuthError("consent_required", 65001, client_id=app["client_id"], app_name=app["name"])
                entry = {
                    "client_id": app["client_id"],
                    "tenant": user_tenant["id"],
                    "delegated": True,
                    "application": False,
                    "graph": resource == GRAPH_RESOURCE,
                }
                if not (for_organization and user["admin"]):
                    entry["upn"] = upn
                previous = [
                    c
                    for c in directory.data["consents"]
                    if c["client_id"] == app["client_id"]
                    and c["tenant"] == user_tenant["id"]
                    and c.get("upn") == entry.get("upn")
                ]
                for consent in previous:  # consenting to Graph later widens the consent given before
                    directory.set_membership("consents", consent, False)
                    entry = dict(consent, graph=True) if resource == GRAPH_RESOURCE else consent
                directory.set_membership("consents", entry, True)
        except OAuthError as error:
            return self._error_to_client(params, error)
        code = secrets.token_urlsafe(48)
        with directory.lock:
            directory.codes[code] = {
                "client_id": app["client_id"],
                "redirect_uri": params["redirect_uri"],
                "upn": upn,
                "resource": resource or GRAPH_RESOURCE,
                "permissions": permissions,
                "oidc": sorted(parse_scopes(params.get("scope"))[2]),
                "nonce": params.get("nonce"),
                "code_challenge": params.get("code_challenge"),
                "code_challenge_method": params.get("code_challenge_method", "plain"),
                "expires": time.time() + CODE_LIFETIME,
                "used": False,
                "mfa": user["require_mfa"],
            }
            session = secrets.token_urlsafe(24)
            directory.sessions[session] = upn
        self._reply_to_client(
            params,
            {"code": code, "session_state": str(uuid.uuid4())},
            {"Set-Cookie": f"{SESSION_COOKIE}={session}; Path=/; Secure; HttpOnly; SameSite=None"},
        )

    def _sign_in_page(self, app, params, eligible, hint, permissions, problem=""):
        identity = self.identity
        hidden = "".join(
            f'<input type="hidden" name="{html.escape(k)}" value="{html.escape(v)}">'
            for k, v in params.items()
            if k not in ("account", "action", "consent", "consent_org")
        )
        accounts = "".join(
            f'<label class="account"><input type="radio" name="account" value="{html.escape(u["upn"])}"'
            f"{' checked' if u['upn'].lower() == hint else ''}> {html.escape(u['name'])} "
            f"&lt;{html.escape(u['upn'])}&gt;</label><br>"
            for u in eligible
        )
        try:
            resource = parse_scopes(params.get("scope"))[0]
        except OAuthError:
            resource = None
        needs_consent = any(not identity.delegated_consent(app, u["tenant"], u["upn"], resource) for u in eligible)
        consent = ""
        if needs_consent and not identity.directory.settings.get("user_consent_allowed", True):
            consent = (
                f"<p id='admin-approval'><b>Need admin approval</b><br>{html.escape(app['name'])} needs permission "
                "to access resources in your organization that only an admin can grant. Please ask an admin to "
                "grant permission to this app before you can use it. Cancel returns to the application without "
                "granting consent.</p>"
            )
        if needs_consent:
            consent += (
                "<fieldset><legend>Permissions requested</legend><ul>"
                + "".join(f"<li>{html.escape(p)}</li>" for p in permissions)
                + '</ul><label><input type="checkbox" name="consent" value="yes" checked> Accept</label>'
                '<br><label><input type="checkbox" name="consent_org" value="yes"> Consent on behalf of '
                "your organization (administrators)</label></fieldset>"
            )
        body = f"""<!DOCTYPE html><html><head><meta charset="utf-8"><title>Sign in to your account</title>
<style>body{{font-family:sans-serif;max-width:32em;margin:3em auto}}.account{{line-height:2}}</style></head>
<body><h1>Microsoft 365 sandbox</h1><p>Sign in to <b>{html.escape(app["name"])}</b>. This is the local sandbox:
no password is asked.</p><p class="problem">{html.escape(problem)}</p>
<form method="POST">{hidden}<fieldset><legend>Pick an account</legend>{accounts}</fieldset>{consent}
<button type="submit" name="action" value="accept" id="accept">Accept</button>
<button type="submit" name="action" value="cancel" id="cancel">Cancel</button></form></body></html>"""
        self._send(200, body, "text/html; charset=utf-8")

    # token ---------------------------------------------------------------------------------

    def _token(self, segment):
        identity, directory = self.identity, self.identity.directory
        form = self._form()
        self._apply_fault()
        grant_type = form.get("grant_type", "")
        directory.count("token_requests")
        directory.count(f"token:{grant_type}")
        directory.count(f"token:{grant_type}:{form.get('client_id', '')}")
        tenant, alias = identity.resolve_tenant(segment)
        token_endpoint = f"{identity.base_url}/{segment}/oauth2/v2.0/token"
        if not form.get("client_id"):
            raise OAuthError("invalid_request", 900144, parameter="client_id")
        if grant_type == "client_credentials":
            return self._send(200, self._client_credentials(form, tenant, alias, token_endpoint))
        app = identity.app_for(form["client_id"], tenant, alias)
        appidacr = identity.authenticate_client(app, form, token_endpoint)
        if grant_type == "authorization_code":
            return self._send(200, self._redeem_code(app, form, appidacr))
        if grant_type == "refresh_token":
            return self._send(200, self._refresh(app, form, appidacr))
        raise OAuthError("invalid_request", 900144, parameter="grant_type")

    def _apply_fault(self):
        directory = self.identity.directory
        with directory.lock:
            fault = directory.fault
            if not fault:
                return
            fault["remaining"] -= 1
            if fault["remaining"] <= 0:
                directory.fault = None
        directory.count(f"fault:{fault['kind']}")
        if fault["kind"] == "hang":
            time.sleep(fault.get("seconds", 30))
        elif fault["kind"] == "429":
            raise OAuthError(
                "temporarily_unavailable", 90055, status=429, headers={"Retry-After": str(fault.get("retry_after", 1))}
            )
        elif fault["kind"] == "503":
            raise OAuthError(
                "temporarily_unavailable", 90033, status=503, headers={"Retry-After": str(fault.get("retry_after", 1))}
            )

    def _redeem_code(self, app, form, appidacr):
        directory = self.identity.directory
        if form.get("redirect_uri") not in app["redirect_uris"]:
            raise OAuthError(
                "invalid_request", 50011, redirect_uri=form.get("redirect_uri", ""), client_id=app["client_id"]
            )
        with directory.lock:
            entry = directory.codes.get(form.get("code") or "")
            if entry is None or entry["client_id"] != app["client_id"]:
                raise OAuthError("invalid_grant", 70000)
            if entry["used"]:
                raise OAuthError("invalid_grant", 54005)
            entry["used"] = True
        if entry["expires"] < time.time():
            raise OAuthError("invalid_grant", 70008)
        if form.get("redirect_uri") != entry["redirect_uri"]:
            raise OAuthError(
                "invalid_grant",
                500112,
                redirect_uri=form.get("redirect_uri", ""),
                code_redirect_uri=entry["redirect_uri"],
            )
        if entry["code_challenge"]:
            verifier = form.get("code_verifier") or ""
            if entry["code_challenge_method"] == "S256":
                computed = _b64url(hashlib.sha256(verifier.encode()).digest())
            else:
                computed = verifier
            if not secrets.compare_digest(computed, entry["code_challenge"]):
                raise OAuthError("invalid_grant", 501481)
        grant = {
            "client_id": app["client_id"],
            "upn": entry["upn"],
            "resource": entry["resource"],
            "permissions": entry["permissions"],
            "oidc": entry.get("oidc", []),
            "mfa": entry["mfa"],
        }
        return self.identity.issue_user_tokens(app, grant, appidacr, nonce=entry["nonce"])

    def _refresh(self, app, form, appidacr):
        identity, directory = self.identity, self.identity.directory
        grant, problem = directory.redeem_refresh_token(form.get("refresh_token"))
        if problem in ("unknown", "used") or (grant and grant["client_id"] != app["client_id"]):
            raise OAuthError("invalid_grant", 70000)
        if problem == "expired":
            raise OAuthError("invalid_grant", 700082, issued=_iso(grant["issued"]))
        user = directory.user(grant["upn"])
        if problem == "revoked":
            raise OAuthError(
                "invalid_grant", 50173, issued=_iso(grant["issued"]), valid_from=_iso(user["sessions_valid_after"])
            )
        resource, permissions, _ = parse_scopes(form.get("scope"))
        if not identity.delegated_consent(app, user["tenant"], user["upn"], resource):
            # No consent (for Graph: none that covers Graph) -> 65001, as for a removed consent
            raise OAuthError("invalid_grant", 65001, client_id=app["client_id"], app_name=app["name"])
        if user.get("blocked_by_conditional_access"):
            raise OAuthError("invalid_grant", 53003)
        if user.get("must_register_mfa"):
            raise OAuthError("invalid_grant", 50079, resource=grant["resource"])
        if user["require_mfa"] and not grant.get("mfa"):
            raise OAuthError("invalid_grant", 50076, resource=grant["resource"])
        # A refresh token is bound to the user and the app, not to the scopes it was issued for:
        # it yields tokens for any permission consented for the app (Microsoft's behaviour).
        if resource:
            known = resource in (*EXCHANGE_RESOURCES, GRAPH_RESOURCE)
            if not known or not set(permissions) <= set(identity.delegated_permissions(app, resource)):
                raise OAuthError("invalid_grant", 70000)
            grant = {**grant, "resource": resource, "permissions": permissions}
        return identity.issue_user_tokens(app, grant, appidacr)

    def _client_credentials(self, form, tenant, alias, token_endpoint):
        identity = self.identity
        if tenant is None:
            raise OAuthError("invalid_request", 900023, tenant=alias)
        app = identity.directory.app(form["client_id"])
        if (
            app is None
            or (not app["multi_tenant"] and tenant["id"] != app["home_tenant"])
            or (
                app["multi_tenant"]
                and tenant["id"] != app["home_tenant"]
                and not identity.directory.consent(app["client_id"], tenant["id"])
            )
        ):
            raise OAuthError("unauthorized_client", 700016, client_id=form["client_id"], tenant_name=tenant["name"])
        appidacr = identity.authenticate_client(app, form, token_endpoint)
        scope = form.get("scope", "")
        if not scope.endswith("/.default") or len(scope.split()) != 1:
            raise OAuthError("invalid_scope", 1002012, scope=scope)
        resource = scope[: -len("/.default")]
        if resource in EXCHANGE_RESOURCES and not tenant["exchange"]:
            raise OAuthError("invalid_resource", 500011, resource=resource, tenant_name=tenant["name"])
        if resource == GRAPH_RESOURCE:
            return identity.issue_app_token(app, tenant, appidacr, GRAPH_RESOURCE)
        if resource not in EXCHANGE_RESOURCES:
            raise OAuthError("invalid_scope", 1002012, scope=scope)
        return identity.issue_app_token(app, tenant, appidacr)

    # introspection and control ---------------------------------------------------------------

    def _introspect(self, form):
        claims, problem = self.identity.directory.verify_access_token(form.get("token"))
        if problem:
            return self._send(200, {"active": False, "reason": problem})
        return self._send(200, {"active": True, **claims})

    def _control(self, action, body):
        try:
            result = _CONTROL[action](self.identity, body)
        except KeyError as exc:
            return self._send(404, {"error": f"unknown control action or entry: {exc}"})
        self._send(200, result or {"ok": True})


def _iso(epoch):
    return datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).strftime("%m/%d/%Y %H:%M:%S")


# Control interface: POST /_sandbox/<action> with a JSON body -----------------------------------


def _control_state(identity):
    directory = identity.directory
    with directory.lock:
        return {
            "counters": dict(directory.counters),
            "fault": directory.fault,
            "settings": directory.settings,
            "consents": directory.data["consents"],
            "grants": directory.data["grants"],
            "service_principals": directory.data["service_principals"],
            "mailboxes": directory.data["mailboxes"],
            "session_order": list(directory.session_order),
        }


def _set_fault(identity, body):
    kind = str(body["kind"])
    with identity.directory.lock:
        identity.directory.fault = (
            None
            if kind == "none"
            else {
                "kind": kind,
                "remaining": int(body.get("count", 1)),
                "retry_after": int(body.get("retry_after", 1)),
                "seconds": float(body.get("seconds", 30)),
            }
        )


def _reset(identity, body):
    identity.directory.reset()
    if identity.graph is not None:  # no request stays held in flight by an earlier test
        from .graph import set_graph_fault

        set_graph_fault(identity.directory, {"kind": "release"}, identity.graph)


def _revoke_sessions(identity, body):
    identity.directory.revoke_sessions(body["user"].lower())


def _expire_access_tokens(identity, body):
    identity.directory.expire_access_tokens(body.get("subject"))


def _expire_refresh_tokens(identity, body):
    identity.directory.expire_refresh_tokens(body.get("user"))


def _settings(identity, body):
    with identity.directory.lock:
        identity.directory.settings.update({k: v for k, v in body.items() if k in identity.directory.settings})
        identity.directory.save()
    return {"settings": identity.directory.settings}


def _smtp_auth(identity, body):
    identity.directory.update("mailboxes", {"address": body["mailbox"].lower()}, {"smtp_auth": bool(body["enabled"])})


def _require_mfa(identity, body):
    identity.directory.update("users", {"upn": body["user"].lower()}, {"require_mfa": bool(body.get("required", True))})


def _user_policy(identity, body):
    values = {
        k: bool(body[k]) for k in ("blocked_by_conditional_access", "must_register_mfa", "require_mfa") if k in body
    }
    identity.directory.update("users", {"upn": body["user"].lower()}, values)


def _consent(identity, body):
    directory = identity.directory
    entry = {
        "client_id": body["client_id"],
        "tenant": body["tenant"],
        "delegated": bool(body.get("delegated", True)),
        "application": bool(body.get("application", True)),
        "graph": bool(body.get("graph", True)),  # the consent covers the Graph permissions too
    }
    with directory.lock:
        directory.data["consents"] = [
            c
            for c in directory.data["consents"]
            if not (c["client_id"] == entry["client_id"] and c["tenant"] == entry["tenant"])
        ]
        if body.get("granted", True):
            directory.data["consents"].append(entry)
        directory.save()


def _grant(identity, body):
    entry = {"right": body["right"], "identity": body["identity"].lower(), "mailbox": body["mailbox"].lower()}
    identity.directory.set_membership("grants", entry, bool(body.get("granted", True)))


def _service_principal(identity, body):
    entry = {
        "client_id": body["client_id"],
        "tenant": body["tenant"],
        "object_id": str(uuid.uuid5(uuid.NAMESPACE_URL, "sp" + body["client_id"] + body["tenant"])),
    }
    directory = identity.directory
    with directory.lock:
        directory.data["service_principals"] = [
            sp
            for sp in directory.data["service_principals"]
            if not (sp["client_id"] == entry["client_id"] and sp["tenant"] == entry["tenant"])
        ]
        if body.get("registered", True):
            directory.data["service_principals"].append(entry)
        directory.save()


def _user_attributes(identity, body):
    """What a tenant's administrator may change on its own user: the Mail attribute (any address, as
    for a user without a mailbox: the nOAuth case), the display name."""
    values = {k: body[k] for k in ("email", "name") if k in body}
    user = identity.directory.user(body["user"])
    if user is None:
        raise KeyError(body["user"])
    identity.directory.update("users", {"upn": user["upn"]}, values)


def _id_token_fault(identity, body):
    kind = str(body["kind"])
    if kind not in (
        "audience",
        "issuer",
        "tenant",
        "nonce",
        "expired",
        "not_yet_valid",
        "signature",
        "unsigned",
        "none",
    ):
        raise KeyError(f"kind={kind!r}")
    with identity.directory.lock:
        identity.directory.id_token_fault = (
            None if kind == "none" else {"kind": kind, "remaining": int(body.get("count", 1))}
        )


def _app(identity, body):
    values = {
        k: v
        for k, v in body.items()
        if k
        in (
            "redirect_uris",
            "secrets",
            "certificates",
            "multi_tenant",
            "delegated",
            "application",
            "graph_delegated",
            "graph_application",
            "name",
        )
    }
    return identity.directory.update("apps", {"client_id": body["client_id"]}, values)


def _add_redirect_uri(identity, body):
    app = identity.directory.app(body["client_id"])
    if app is None:
        raise KeyError(body["client_id"])
    if body["redirect_uri"] not in app["redirect_uris"]:
        identity.directory.update(
            "apps", {"client_id": app["client_id"]}, {"redirect_uris": app["redirect_uris"] + [body["redirect_uri"]]}
        )


def _deliver(identity, body):
    """Put a message into a mailbox's INBOX, as if someone had mailed it."""
    if identity.deliver is None:
        raise KeyError("mail servers are not running")
    message = email.message.EmailMessage()
    message["From"] = body.get("sender", "someone@fabrikam.example")
    message["To"] = body["mailbox"]
    message["Subject"] = body.get("subject", "Hello")
    message["Date"] = email.utils.formatdate(localtime=False)
    message["Message-ID"] = email.utils.make_msgid(domain="sandbox.invalid")
    if body.get("content_type") == "application/pkcs7-mime":  # opaque S/MIME (encrypted or signed)
        message.set_content(
            b"0\x80\x06\x09*\x86H\x86\xf7\r\x01\x07\x03\xa0\x80",
            maintype="application",
            subtype="pkcs7-mime",
            params={"smime-type": "enveloped-data", "name": "smime.p7m"},
            filename="smime.p7m",
        )
    else:
        message.set_content(body.get("body", ""))
    identity.deliver(body["mailbox"], message.as_bytes())
    return {"message_id": message["Message-ID"]}


def _mail_throttle(identity, body):
    if body.get("where", "command") not in ("command", "fetch", "store"):
        raise KeyError(f"where={body['where']!r} (command, fetch or store)")
    with identity.directory.lock:
        identity.directory.mail_throttles[body["mailbox"].lower()] = {
            "backoff_ms": int(body.get("backoff_ms", 2000)),
            "remaining": int(body.get("count", 1)),
            # "command": BAD + BYE after login; "fetch" / "store": NO on FETCH / STORE
            "where": body.get("where", "command"),
        }


def _add_mailboxes(identity, body):
    """More mailboxes for scale runs: `addresses`, `kind` (user / shared), `app_access` (default true)."""
    added = identity.directory.add_mailboxes(
        body["addresses"], kind=body.get("kind", "user"), app_access=bool(body.get("app_access", True))
    )
    return {"added": len(added)}


def _mail_stall(identity, body):
    """A hung mailbox: every IMAP/POP3 command after login (or only those named `where`, e.g.
    "store") waits until `stalled` is false again."""
    identity.directory.stall_mail(body["mailbox"], bool(body.get("stalled", True)), body.get("where", "command"))


def _mailbox_enabled(identity, body):
    identity.directory.update("mailboxes", {"address": body["mailbox"].lower()}, {"enabled": bool(body["enabled"])})


def _graph_fault(identity, body):
    from .graph import set_graph_fault

    set_graph_fault(identity.directory, body, identity.graph)


def _graph_app_scope(identity, body):
    from .graph import set_app_scope

    set_app_scope(identity.directory, body)


_CONTROL = {
    "graph_fault": _graph_fault,
    "graph_app_scope": _graph_app_scope,
    "user_policy": _user_policy,
    "mail_throttle": _mail_throttle,
    "mail_stall": _mail_stall,
    "add_mailboxes": _add_mailboxes,
    "mailbox_enabled": _mailbox_enabled,
    "deliver": _deliver,
    "token_fault": _set_fault,
    "reset": _reset,
    "revoke_sessions": _revoke_sessions,
    "expire_access_tokens": _expire_access_tokens,
    "expire_refresh_tokens": _expire_refresh_tokens,
    "settings": _settings,
    "smtp_auth": _smtp_auth,
    "require_mfa": _require_mfa,
    "consent": _consent,
    "grant": _grant,
    "service_principal": _service_principal,
    "app": _app,
    "user_attributes": _user_attributes,
    "id_token_fault": _id_token_fault,
    "add_redirect_uri": _add_redirect_uri,
}
