"""What tests (core and Odoo tier) use to drive the sandbox: start it, read its seed, pull its levers,
and sign in on its page the way a person would."""

import atexit
import base64
import html.parser
import json
import os
import tempfile
import threading
from pathlib import Path
from urllib.parse import parse_qsl, urljoin, urlsplit

import requests


class _FormParser(html.parser.HTMLParser):
    """Collects the first form's action and fields (enough for the sign-in and form_post pages)."""

    def __init__(self):
        super().__init__()
        self.action, self.fields, self.radios, self._in_form = None, {}, [], False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "form" and self.action is None:
            self.action, self._in_form = attrs.get("action", ""), True
        elif tag == "input" and self._in_form:
            if attrs.get("type") == "radio":
                self.radios.append(attrs.get("value"))
            elif attrs.get("type") == "checkbox":
                if "checked" in attrs:
                    self.fields[attrs["name"]] = attrs.get("value", "on")
            elif attrs.get("name"):
                self.fields[attrs["name"]] = attrs.get("value", "")

    def handle_endtag(self, tag):
        if tag == "form":
            self._in_form = False


class Sandbox:
    """A handle on a running sandbox, from its sandbox.json."""

    def __init__(self, description):
        self.description = description
        self.http = requests.Session()
        self.http.trust_env = False  # REQUESTS_CA_BUNDLE must not override the sandbox CA
        self.http.verify = description["ca_file"]

    @classmethod
    def attach(cls, state_dir):
        return cls(json.loads((Path(state_dir) / "sandbox.json").read_text()))

    # seed ----------------------------------------------------------------------------------

    @property
    def identity_url(self):
        return self.description["identity_url"]

    @property
    def ca_file(self):
        return self.description["ca_file"]

    @property
    def ports(self):
        return self.description["ports"]

    @property
    def host(self):
        return self.description["host"]

    def tenant(self, name="Contoso"):
        return next(t for t in self.description["directory"]["tenants"] if t["name"] == name)

    def app(self, name="Odoo Mail (sandbox)"):
        return next(a for a in self.description["directory"]["apps"] if a["name"] == name)

    def secret(self, app_name="Odoo Mail (sandbox)", which="current"):
        return next(s["value"] for s in self.app(app_name)["secrets"] if s["name"] == which)

    def certificate(self, app_name="Odoo Mail (sandbox)", which="current"):
        return next(c for c in self.app(app_name)["certificates"] if c["name"] == which)

    def user(self, upn):
        return next(u for u in self.description["directory"]["users"] if u["upn"] == upn)

    def authority(self, tenant=None):
        return f"{self.identity_url}/{tenant or self.tenant()['id']}"

    def odoo_app_values(self, app_name="Odoo Mail (sandbox)", secret="current"):
        """Field values of an Odoo app registration (microsoft365.app) pointing at this sandbox."""
        host, ports = self.host, self.ports
        return {
            "name": f"{app_name} at {self.identity_url}",
            "cloud": "custom",
            "tenant": self.tenant()["id"],
            "client_id": self.app(app_name)["client_id"],
            "client_secret": self.secret(app_name, secret),
            "authority_host": self.identity_url,
            "delegated_resource": self.description["mail_resource"],
            "app_resource": self.description["app_resource"],
            "graph_url": self.description.get("graph_url") or False,
            "graph_resource": self.description.get("graph_resource") or False,
            "imap_host": host,
            "imap_port": ports["imaps"],
            "pop_host": host,
            "pop_port": ports["pop3s"],
            "smtp_host": host,
            "smtp_port": ports["smtp"],
            "ca_certificate": base64.b64encode(Path(self.ca_file).read_bytes()).decode("ascii"),
        }

    # control interface -----------------------------------------------------------------------

    def control(self, action, **body):
        response = self.http.post(f"{self.identity_url}/_sandbox/{action}", json=body, timeout=10)
        response.raise_for_status()
        return response.json()

    def state(self):
        return self.http.get(f"{self.identity_url}/_sandbox/state", timeout=10).json()

    def counter(self, name):
        return self.state()["counters"].get(name, 0)

    def reset(self):
        self.control("reset")

    # a person at the sign-in page -------------------------------------------------------------

    def sign_in(self, authorize_url, account, accept=True, consent=True, consent_for_organization=False, browser=None):
        """Open the authorize URL, pick `account`, press Accept (or Cancel), and return the parameters
        the redirect URI receives (code/state or error/...), without calling the redirect URI."""
        browser = browser or self.http
        response = browser.get(authorize_url, allow_redirects=False, timeout=10)
        if response.status_code == 200 and "hiddenform" not in response.text:
            form = _FormParser()
            form.feed(response.text)
            fields = dict(form.fields)
            fields["account"] = account
            fields["action"] = "accept" if accept else "cancel"
            if not consent:
                fields.pop("consent", None)
            if consent_for_organization:
                fields["consent_org"] = "yes"
            response = browser.post(
                urljoin(authorize_url, form.action or urlsplit(authorize_url).path),
                data=fields,
                allow_redirects=False,
                timeout=10,
            )
        return _callback_parameters(response)


def _callback_parameters(response):
    if response.status_code in (302, 303):
        location = response.headers["Location"]
        return {"redirect_uri": location.split("?")[0], **dict(parse_qsl(urlsplit(location).query))}
    if response.status_code == 200 and "hiddenform" in response.text:
        form = _FormParser()
        form.feed(response.text)
        return {"redirect_uri": form.action, **form.fields}
    raise AssertionError(f"the sign-in did not return to the client: {response.status_code} {response.text[:500]}")


_shared = None
_shared_lock = threading.Lock()


def shared_sandbox():
    """One sandbox per test process (free ports, own state folder), stopped when the process exits.

    SANDBOX_STATE points at an already running sandbox instead (python -m sandbox start)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            if os.environ.get("SANDBOX_STATE"):
                _shared = Sandbox.attach(os.environ["SANDBOX_STATE"])
            else:
                from .service import SandboxService

                state = tempfile.mkdtemp(prefix="m365-sandbox-")
                service = SandboxService(state, ports="auto").start()
                atexit.register(service.stop)
                _shared = Sandbox(service.description())
                _shared.service = service
        return _shared
